"""Multi-process training on the CPU (gloo): DDP and FSDP2 through torchrun (and accelerate launch).

The global batch is cut into contiguous per-rank slices of the same token stream, so two
processes must follow the single-process loss trajectory, and checkpoints must resume across
world sizes in both directions.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CONFIG = """
model: {d_model: 32, n_layers: 2, n_heads: 2, max_seq_len: 32}
data: {seq_len: 32, val_sequences: 16}
train: {steps: 8, global_batch_tokens: 512, log_every: 1, eval_every: 4}
checkpoint: {every: 4}
logging: {wandb: false, progress: false}
"""
EMA = "train.ema_decay=0.9"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, run_dir: Path, nproc: int, *overrides: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "testbed"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "testbed"]
    out = subprocess.run(cmd + ["train", str(config), "--run-dir", str(run_dir), *overrides],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["train_loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in x]


def val_losses(run_dir: Path, key: str = "val_loss") -> list[float]:
    return [json.loads(x)[key] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if f'"{key}"' in x]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    config = root / "config.yaml"
    config.write_text(CONFIG)
    launch(config, root / "single", 1, EMA)  # the moving average changes no training number
    return root, config


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_trajectory(setup, parallel):
    root, config = setup
    # DDP keeps the EMA of the weights too (FSDP2 shards the weights: it refuses one).
    launch(config, root / parallel, 2, f"train.parallel={parallel}", *([EMA] if parallel == "ddp" else []))
    ref, got = losses(root / "single"), losses(root / parallel)
    assert len(got) == len(ref) == 8
    assert got == pytest.approx(ref, rel=1e-5)
    assert val_losses(root / parallel) == pytest.approx(val_losses(root / "single"), rel=1e-5)
    run = json.loads((root / parallel / "run.json").read_text())
    assert run["world_size"] == 2
    if parallel == "ddp":
        # Every process updates the same average of the same weights: the single process's.
        single_ema = val_losses(root / "single", "val_loss_ema")
        assert len(single_ema) == 2 and single_ema != val_losses(root / "single")
        assert val_losses(root / parallel, "val_loss_ema") == pytest.approx(single_ema, rel=1e-5)
        got_ema, want_ema = (load_file(str(root / name / "checkpoints" / "step_00000008" / "ema.safetensors"))
                             for name in (parallel, "single"))
        for key, value in want_ema.items():
            torch.testing.assert_close(got_ema[key], value, rtol=1e-5, atol=1e-6)


def interrupt_after_first_checkpoint(src: Path, dst: Path) -> None:
    """Copy a finished run and cut it back to its step-4 checkpoint, as a kill right after that
    checkpoint would have left it."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_00000008")
    (dst / "status.json").write_text(json.dumps({"state": "running", "step": 6}))


def test_accelerate_launch_trains_like_torchrun(setup):
    """`accelerate launch -m testbed train` starts the processes through torchrun's variables, so
    two processes follow the single-process trajectory as under torchrun."""
    root, config = setup
    run_dir = root / "accelerate"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "testbed", "train", str(config), "--run-dir", str(run_dir)]
    out = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    assert losses(run_dir) == pytest.approx(losses(root / "single"), rel=1e-5)
    assert val_losses(run_dir) == pytest.approx(val_losses(root / "single"), rel=1e-5)


@pytest.mark.parametrize("first, second, parallel", [(2, 1, "fsdp"), (1, 2, "ddp"), (2, 1, "ddp")])
def test_checkpoints_resume_across_world_sizes(setup, first, second, parallel):
    root, config = setup
    source = root / f"src-{first}-{parallel}"
    if not source.exists():
        launch(config, source, first, f"train.parallel={parallel}")
    resumed = root / f"resume-{first}to{second}-{parallel}"
    interrupt_after_first_checkpoint(source, resumed)
    launch(config, resumed, second, f"train.parallel={parallel}", "--resume")
    assert "resume from" in (resumed / "train.log").read_text()
    assert losses(resumed) == pytest.approx(losses(root / "single"), rel=1e-5)
    assert val_losses(resumed)[-1] == pytest.approx(val_losses(root / "single")[-1], rel=1e-5)



def test_a_stop_inside_a_logging_window_resumes_bit_for_bit(setup):
    """The step-4 checkpoint falls inside a 3-step logging window: resumed on two processes, each
    continues its own share of the window, so the next logged mean is the uninterrupted one."""
    root, config = setup
    full, resumed = root / "window-full", root / "window-resumed"
    launch(config, full, 2, "train.log_every=3")
    interrupt_after_first_checkpoint(full, resumed)
    launch(config, resumed, 2, "train.log_every=3", "--resume")
    assert "resume from" in (resumed / "train.log").read_text()
    assert losses(resumed) == losses(full)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of one trainer rank among the launcher's children (by its RANK variable)."""
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_ends_the_run_resumable(tmp_path, fault):
    """Rank 1 SIGKILLed (out of memory, a crash) or SIGSTOPped (hung, a frozen node) after the
    first rolling checkpoint: rank 0's next collective fails at once or after
    train.collective_timeout_s, and the run stops in bounded time, resumable, saying why."""
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("steps: 8", "steps: 3000").replace("checkpoint: {every: 4}",
                                                                         "checkpoint: {rolling_every: 20}"))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "testbed", "train",
           str(config), "--run-dir", str(run_dir), "train.collective_timeout_s=5"]
    launcher = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        index = run_dir / "checkpoints" / "index.jsonl"
        deadline = time.time() + 120
        while not (index.exists() and index.read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)
        victim = rank_pid(launcher, 1)
        assert victim is not None and launcher.poll() is None, "the run ended before the fault"
        os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        faulted = time.time()
        output = launcher.communicate(timeout=90)[0]  # never a silent hang
        took = time.time() - faulted
    finally:
        if launcher.poll() is None:
            launcher.kill()
        subprocess.run(["pkill", "-KILL", "-f", str(run_dir)], capture_output=True)
    assert launcher.returncode != 0
    assert took < (20 if fault == "killed" else 5 + 40), took  # the timeout, then torchrun's shutdown
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["lost_peer"], status
    assert "lost a peer process" in status["message"]
    assert ("Timed out" if fault == "hung" else "lost a peer") in status["message"]
    assert output.count("error: lost a peer process") >= 1
    # Started again, it resumes from the last checkpoint (here: as one process).
    launch(config, run_dir, 1, "--resume")
    assert "resume from" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"


# A stand-in for a gloo thread that outlives Python: an object that aborts the process if it is
# ever finalized. A correctly finished rank must still exit with its own code, its output and
# atexit handlers intact.
ABORTS_AT_TEARDOWN = """
import atexit, os, signal, sys
from testbed import exits
from testbed.cli import main

class Thread:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGABRT)

holder = Thread()
atexit.register(lambda: print("atexit ran"))
if sys.argv[1] == "rank":
    exits.skip_finalization()  # as init_distributed does
sys.exit(main(["study", "list"]))
"""


@pytest.mark.parametrize("process", ["rank", "plain"])
def test_a_rank_exits_with_its_code_without_tearing_the_interpreter_down(tmp_path, process):
    """A torchrun rank aborted now and then at interpreter teardown after a correct run (SIGABRT,
    'terminate called without an active exception'): after joining a process group, the process
    ends with os._exit once main returns. A process that joined none finalizes as usual."""
    out = subprocess.run([sys.executable, "-c", ABORTS_AT_TEARDOWN, process], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    if process == "rank":
        assert out.returncode == 0, out.stderr[-2000:]
    else:
        assert out.returncode == -signal.SIGABRT, "the stand-in no longer aborts at teardown"
    assert "chinchilla" in out.stdout and out.stdout.rstrip().endswith("atexit ran"), out.stdout[-500:]
