"""The fork server: trainers forked from one warm process give what fresh processes give."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from testbed.sweep.forkserver import ForkServer
from testbed.sweep.local import LocalExecutor, fork_server_usable
from testbed.sweep.registry import Registry
from testbed.sweep.spec import load_sweep

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not fork_server_usable(), reason="the fork server needs Linux")]

TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "dropout": 0.1},
    "data": {"seq_len": 32, "val_sequences": 8},
    "train": {"steps": 12, "global_batch_tokens": 256, "eval_every": 6, "log_every": 3},
    "checkpoint": {"log_spaced": 3},
    "logging": {"wandb": False, "progress": False},
}
TIMING_FIELDS = ("tokens_per_s", "mfu", "peak_mem_gb")

# An `imports:` plugin: registers a block placement when imported.
POST_NORM = textwrap.dedent('''
    from testbed.model.transformer import PLACEMENTS, PreNormBlock

    @PLACEMENTS.register("post_fork_test")
    class PostNormBlock(PreNormBlock):
        def forward(self, x):
            x = self.attn_norm(x + self.drop(self.attn(x)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
''')


def deep_update(base: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        *sections, name = key.split(".")
        target = out
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    return out


def write_config(path: Path, **changes) -> str:
    path.write_text(yaml.safe_dump(deep_update(TINY, {k.replace("__", "."): v
                                                      for k, v in changes.items()})))
    return str(path)


def slot_env(**extra) -> dict[str, str]:
    """A CPU slot's environment; block-buffered output, as usual outside a test runner."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def train_fresh(config: str, run_dir: Path, log: Path, env: dict[str, str]) -> int:
    with open(log, "ab") as out:
        return subprocess.run([sys.executable, "-m", "testbed", "train", config, "--run-dir",
                               str(run_dir)], stdout=out, stderr=subprocess.STDOUT, env=env,
                              timeout=300).returncode


def train_forked(server: ForkServer, config: str, run_dir: Path, log: Path) -> int:
    child = server.start(["train", config, "--run-dir", str(run_dir)], log)
    try:
        return server.wait(child)
    finally:
        child.close()


def metric_lines(run_dir: Path) -> list[str]:
    """metrics.jsonl with the timing fields dropped, each line as written otherwise."""
    lines = []
    for raw in (run_dir / "metrics.jsonl").read_text().splitlines():
        line = json.loads(raw)
        lines.append(json.dumps({k: v for k, v in line.items() if k not in TIMING_FIELDS}))
    return lines


def final_model_sha(run_dir: Path) -> str:
    index = [json.loads(l) for l in (run_dir / "checkpoints" / "index.jsonl").read_text().splitlines()]
    last = max(index, key=lambda entry: entry["step"])
    return hashlib.sha256((run_dir / last["path"] / "model.safetensors").read_bytes()).hexdigest()


def assert_same_run(a: Path, b: Path) -> None:
    assert metric_lines(a) == metric_lines(b)
    assert final_model_sha(a) == final_model_sha(b)
    assert json.loads((a / "status.json").read_text()) == json.loads((b / "status.json").read_text())


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    servers = []

    def start(env: dict[str, str] | None = None) -> ForkServer:
        servers.append(ForkServer(env or slot_env()))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_a_forked_run_is_identical_to_a_fresh_process(tmp_path, server):
    config = write_config(tmp_path / "tiny.yaml")
    env = slot_env()
    assert train_fresh(config, Path("fresh"), tmp_path / "fresh.log", env) == 0
    assert train_forked(server(env), config, Path("forked"), tmp_path / "forked.log") == 0
    assert_same_run(tmp_path / "fresh", tmp_path / "forked")
    # The trainer's own output too (it names its run directory).
    fresh = (tmp_path / "fresh.log").read_text().replace("fresh", "RUN")
    forked = (tmp_path / "forked.log").read_text().replace("forked", "RUN")
    assert fresh == forked and "val_loss" in forked


def test_runs_in_one_server_do_not_see_each_other(tmp_path, server):
    """Several runs, one after another, in one server: each as a fresh process gives. A plugin
    registered by one run's `imports:` must not exist for the next; RNG draws (dropout) of one
    run must not shift the next."""
    (tmp_path / "fork_test_plugin.py").write_text(POST_NORM)
    env = slot_env(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path),
                                                            os.environ.get("PYTHONPATH")])))
    plain = write_config(tmp_path / "plain.yaml")
    plugin = write_config(tmp_path / "plugin.yaml", imports=["fork_test_plugin"],
                          model__norm_placement="post_fork_test", train__seed=3)
    orphan = write_config(tmp_path / "orphan.yaml", model__norm_placement="post_fork_test")
    (tmp_path / "fork_test_broken.py").write_text("raise RuntimeError('broken plugin')\n")
    broken = write_config(tmp_path / "broken.yaml", imports=["fork_test_broken"])
    fs = server(env)
    codes = [train_forked(fs, plain, Path("a1"), tmp_path / "a1.log"),
             train_forked(fs, plugin, Path("p"), tmp_path / "p.log"),
             train_forked(fs, orphan, Path("o"), tmp_path / "o.log"),
             train_forked(fs, broken, Path("b"), tmp_path / "b.log"),
             train_forked(fs, plain, Path("a2"), tmp_path / "a2.log")]
    assert codes == [0, 0, 2, 1, 0]
    # An uncaught exception: its traceback in the log and exit 1, as a fresh interpreter does.
    assert train_fresh(broken, Path("b_fresh"), tmp_path / "b_fresh.log", env) == 1
    forked_log = (tmp_path / "b.log").read_text()
    assert "Traceback" in forked_log
    assert forked_log.splitlines()[-1] == (tmp_path / "b_fresh.log").read_text().splitlines()[-1]
    assert forked_log.splitlines()[-1] == "RuntimeError: broken plugin"
    # The placement exists only where the run imports it, as in a fresh process.
    assert "not a registered" in (tmp_path / "o.log").read_text()
    assert train_fresh(orphan, Path("o_fresh"), tmp_path / "o_fresh.log", env) == 2
    assert (tmp_path / "o.log").read_text() == (tmp_path / "o_fresh.log").read_text()
    assert train_fresh(plain, Path("a_fresh"), tmp_path / "a_fresh.log", env) == 0
    assert train_fresh(plugin, Path("p_fresh"), tmp_path / "p_fresh.log", env) == 0
    for forked in ("a1", "a2"):
        assert_same_run(tmp_path / "a_fresh", tmp_path / forked)
    assert_same_run(tmp_path / "p_fresh", tmp_path / "p")


def test_sigterm_to_a_forked_child_preempts_it_and_it_resumes(tmp_path, server):
    config = write_config(tmp_path / "long.yaml", train__steps=200, train__log_every=10,
                          train__eval_every=100)
    fs = server()
    child = fs.start(["train", config, "--run-dir", "run"], tmp_path / "run.log")
    status = tmp_path / "run" / "status.json"
    deadline = time.time() + 120
    while not (status.exists() and json.loads(status.read_text())["state"] == "running"):
        assert time.time() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    assert fs.wait(child) == 75
    child.close()
    saved = json.loads(status.read_text())
    assert saved["state"] == "preempted" and saved["step"] < 200
    assert train_forked(fs, config, Path("run"), tmp_path / "run.log") == 0  # resumes
    assert train_fresh(config, Path("whole"), tmp_path / "whole.log", slot_env()) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "run")


def test_sigterm_to_the_sweep_reaches_the_forked_trainer(tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "long", "base": deep_update(TINY, {
        "train.steps": 200, "train.log_every": 10, "train.eval_every": 100})}))
    runner = textwrap.dedent("""
        import sys
        from testbed.sweep.local import LocalExecutor
        from testbed.sweep.registry import Registry
        from testbed.sweep.spec import load_sweep
        registry = Registry(sys.argv[1])
        ids = registry.add_runs(load_sweep(sys.argv[2]))
        print(LocalExecutor(registry, ids, progress=False).run(), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", runner, str(tmp_path / "sweep"), str(sweep_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    registry = Registry(tmp_path / "sweep")
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline and proc.poll() is None
        records = registry.records()
        if records:
            status = registry.run_status(records[0]["run_id"]) or {}
            if status.get("state") == "running":
                break
        time.sleep(0.05)
    run_id = records[0]["run_id"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "preempted" in out
    record = registry.read(run_id)
    assert record["state"] == "preempted" and record["last_exit_code"] == 75
    assert "forked by fork server" in registry.log_path(run_id).read_text()
    # It resumes where it stopped, through the fork server again, to the uninterrupted result.
    ids = registry.add_runs(load_sweep(str(sweep_file)))
    assert LocalExecutor(registry, ids, progress=False).run() == {"done": 1}
    config = str(registry.config_path(run_id))
    assert train_fresh(config, tmp_path / "whole", tmp_path / "whole.log", slot_env()) == 0
    assert_same_run(tmp_path / "whole", registry.run_dir(run_id))


def test_bad_config_exits_2_with_its_error_in_the_log(tmp_path):
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(load_sweep({"name": "bad", "base": TINY,
                                        "grid": {"train.seed": [0, 1]}}))
    bad = registry.config_path(ids[0])
    bad.write_text(bad.read_text().replace("d_model: 32", "d_modle: 32"))
    executor = LocalExecutor(registry, ids, progress=False)
    assert executor.fork_server
    assert executor.run() == {"done": 1, "failed": 1}
    record = registry.read(ids[0])
    assert record["last_exit_code"] == 2 and record["retryable"] is False
    assert record["launches"] == 1
    assert "error:" in record["reason"] and "d_modle" in record["reason"]
    log = registry.log_path(ids[0]).read_text()
    assert "forked by fork server" in log and "Traceback" not in log
    assert log.rstrip().splitlines()[-1].startswith("error:")


def test_the_server_dying_mid_sweep_loses_no_run(tmp_path, capsys):
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(load_sweep({"name": "two", "base": deep_update(TINY, {
        "train.steps": 200, "train.log_every": 10, "train.eval_every": 100}),
        "grid": {"train.seed": [0, 1]}}))
    executor = LocalExecutor(registry, ids, progress=False)
    result = {}
    thread = threading.Thread(target=lambda: result.update(executor.run()), daemon=True)
    thread.start()
    deadline = time.time() + 120

    def training() -> str | None:
        """The run whose forked trainer has written status.json: past its start-up, so the
        server's death cannot leave it unstarted (a trainer that never wrote it is started again)."""
        for record in registry.records():
            if record["state"] == "running" and (registry.run_status(record["run_id"]) or {}).get("state") == "running":
                return record["run_id"]
        return None

    while not (executor.children and training()):
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.02)
    first = training()
    os.kill(executor.servers[0].pid, signal.SIGKILL)
    assert (registry.run_status(first) or {}).get("state") != "done"  # killed under a live trainer
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert result == {"done": 2}
    records = {r["run_id"]: r for r in registry.records()}
    assert all(r["launches"] == 1 and not r.get("failures") for r in records.values())
    assert "fresh processes from now on" in capsys.readouterr().err
    # The forked trainer went on to the end after losing its server; the other run started fresh.
    second = next(i for i in ids if i != first)
    first_log = registry.log_path(first).read_text()
    assert "forked by fork server" in first_log and first_log.count("\n=== ") == 1  # started once
    assert "forked by fork server" not in registry.log_path(second).read_text()
    config = str(registry.config_path(first))
    assert train_fresh(config, tmp_path / "whole", tmp_path / "whole.log", slot_env()) == 0
    assert_same_run(tmp_path / "whole", registry.run_dir(first))


# A server that is ready, reads one request and dies without starting anything.
DYING_SERVER = textwrap.dedent("""
    import json, sys
    print(json.dumps({"event": "ready", "pid": 0}), flush=True)
    sys.stdin.readline()
    sys.exit(3)
""")


def test_a_server_that_dies_before_starting_the_run_loses_nothing(tmp_path):
    script = tmp_path / "dying_server.py"
    script.write_text(DYING_SERVER)
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(load_sweep({"name": "one", "base": TINY,
                                        "grid": {"train.seed": [0, 1]}}))
    executor = LocalExecutor(registry, ids, progress=False)
    executor.fork_server_command = [sys.executable, str(script)]
    assert executor.run() == {"done": 2}
    assert all(r["launches"] == 1 and not r.get("failures") for r in registry.records())
    logs = [registry.log_path(run_id).read_text() for run_id in ids]
    # One request went to the server, which died on it; both runs trained in fresh processes.
    assert sum(log.count("forked by fork server") for log in logs) == 1
    assert all(log.count("\n=== ") - log.count("forked by") == 1 and "val_loss" in log
               for log in logs)


def test_no_fork_server_starts_fresh_processes(tmp_path):
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(load_sweep({"name": "one", "base": TINY}))
    executor = LocalExecutor(registry, ids, progress=False, fork_server=False)
    assert executor.fork_server is False
    assert executor.run() == {"done": 1}
    log = registry.log_path(ids[0]).read_text()
    assert "val_loss" in log and "fork server" not in log
