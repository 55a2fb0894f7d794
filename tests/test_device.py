"""The device switch and the parts of the GPU path that run the same logic on a CPU: device
resolution, compile default, automatic micro-batch, the prefetching loader, window timing."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from testbed.config import load_config
from testbed.train import checkpoint as ckpt
from testbed.train import device as dev
from testbed.train.prefetch import Prefetcher
from testbed.train.trainer import train

COMMON = ["model.preset=100k", "data.seq_len=32", "model.max_seq_len=32", "train.global_batch_tokens=256",
          "logging.wandb=false", "logging.progress=false", "train.device=cpu"]


def test_plain_cuda_resolves_to_this_process_gpu(monkeypatch):
    """torch.cuda.set_device and the RNG calls need an index: `cuda` alone once crashed the trainer."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert dev.resolve_device("cuda") == torch.device("cuda", 2)
    assert dev.resolve_device("cuda:3") == torch.device("cuda", 3)
    assert dev.resolve_device("auto") == torch.device("cuda", 2)


def test_compile_defaults_to_the_device():
    assert load_config(None, []).train.compile is None
    assert dev.use_compile(None, torch.device("cuda", 0)) is True
    assert dev.use_compile(None, torch.device("cpu")) is False
    assert dev.use_compile(True, torch.device("cpu")) is True


class CountingPlan:
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at
        self.thread_names = set()

    def batch_tokens(self, step, rank, world):
        self.calls.append(step)
        self.thread_names.add(threading.current_thread().name)
        if step == self.fail_at:
            raise ValueError(f"bad shard at step {step}")
        return np.full((2, 3), step + 10 * rank, dtype=np.int64)


def test_prefetcher_reads_ahead_in_a_thread_and_keeps_the_order():
    plan = CountingPlan()
    pf = Prefetcher(plan, rank=1, world=2, device=torch.device("cpu"), threaded=True)
    got = [int(pf.get(s, s + 1 if s < 4 else None)[0, 0]) for s in range(5)]
    pf.close()
    assert got == [10, 11, 12, 13, 14]
    assert sorted(plan.calls) == [0, 1, 2, 3, 4]  # each batch built once
    assert any(name.startswith("prefetch") for name in plan.thread_names)


def test_prefetcher_reraises_a_data_error_at_its_step():
    pf = Prefetcher(CountingPlan(fail_at=2), rank=0, world=1, device=torch.device("cpu"), threaded=True)
    pf.get(0, 1)
    pf.get(1, 2)
    with pytest.raises(ValueError, match="bad shard at step 2"):
        pf.get(2, 3)
    pf.close()


def test_on_a_cpu_batches_are_read_in_the_training_thread():
    plan = CountingPlan()
    pf = Prefetcher(plan, 0, 1, torch.device("cpu"))
    assert [int(pf.get(s, s + 1)[0, 0]) for s in range(3)] == [0, 1, 2]
    pf.close()
    assert plan.calls == [0, 1, 2] and plan.thread_names == {threading.current_thread().name}


def test_a_jump_in_steps_is_read_directly():
    plan = CountingPlan()
    pf = Prefetcher(plan, 0, 1, torch.device("cpu"), threaded=True)
    pf.get(0, 1)
    assert int(pf.get(5, 6)[0, 0]) == 5  # not the prefetched step 1
    pf.close()


def test_cpu_micro_batch_defaults_to_all_sequences(tmp_path):
    summary = train(load_config(None, COMMON + ["train.steps=2"]), tmp_path / "r")
    assert summary["micro_batch_size"] == 256 // 32
    assert summary["timing"]["compile_s"] == 0.0 and summary["timing"]["restore_s"] >= 0


def test_throughput_window_leaves_out_checkpoint_time(tmp_path, monkeypatch):
    """A save inside a logging window must not show up as a slower training speed. Each save
    moves the clock on by 100 s (a clock the trainer reads, not a sleep), so the check holds on
    a machine however loaded: six tiny steps never take 100 s."""
    real_save, real_clock, saved = ckpt.save, time.perf_counter, [0.0]

    def slow_save(*args, **kwargs):
        saved[0] += 100.0
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save", slow_save)
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + saved[0])
    run = tmp_path / "r"
    train(load_config(None, COMMON + ["train.steps=12", "train.log_every=6", "checkpoint.every=3",
                                      "train.eval_every=1000"]), run)
    windows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [x for x in windows if "tokens_per_s" in x]
    seconds = [6 * 256 / x["tokens_per_s"] for x in windows]
    assert saved[0] >= 400.0  # each window held two saves
    assert len(seconds) == 2 and max(seconds) < 100.0, seconds


def test_memory_probe_runs_the_steady_state_step(monkeypatch):
    """The probe's verdict covers a steady-state step: a forward and backward that run beside the
    optimiser's moments (created by the first step), and an update taken while a copy of the
    weights is held, as on a logging step. A one-step probe saw neither and could pick a
    micro-batch that fails from the second step on."""
    from testbed.model.transformer import Transformer
    from testbed.plan import resolved_model
    from testbed.train.memory import fits

    seen = []
    forward = Transformer.forward

    def recording(self, *args, **kwargs):
        seen.append(len(self.probe_optimizer.state) if hasattr(self, "probe_optimizer") else None)
        return forward(self, *args, **kwargs)

    import testbed.optim

    build = testbed.optim.build_optimizer

    def remembering(model, cfg, device):
        model.probe_optimizer = build(model, cfg, device)
        return model.probe_optimizer

    monkeypatch.setattr(Transformer, "forward", recording)
    monkeypatch.setattr(testbed.optim, "build_optimizer", remembering)
    config = load_config(None, COMMON)
    assert fits(config, 2, torch.device("cpu")) is True
    n_tensors = len(list(Transformer(resolved_model(config)).parameters()))
    assert seen == [0, n_tensors]  # the second forward ran with every parameter's moments allocated


@pytest.mark.slow
def test_compiled_blocks_keep_checkpoint_names_and_time_compilation_apart(tmp_path):
    """Regional compilation: the checkpoint a compiled run writes has the plain model's names (a
    whole-model torch.compile would prefix them with _orig_mod.), so a run may be resumed with
    compilation switched on or off; the compiling first step is timed apart from the steps."""
    from safetensors import safe_open

    def keys(run):
        with safe_open(str(next((run / "checkpoints").glob("step_*")) / "model.safetensors"), "pt") as f:
            return sorted(f.keys())

    plain = train(load_config(None, COMMON + ["train.steps=3"]), tmp_path / "plain")
    compiled = train(load_config(None, COMMON + ["train.steps=3", "train.compile=true"]), tmp_path / "compiled")
    assert keys(tmp_path / "compiled") == keys(tmp_path / "plain")
    assert compiled["timing"]["compile_s"] > 0 and plain["timing"]["compile_s"] == 0
    assert compiled["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-3)
    # train.cuda_graphs: the whole forward compiled (reduce-overhead; on a CPU without graphs), the
    # same names and losses, its warm-up steps timed apart, and run.json saying which path ran
    graphs = train(load_config(None, COMMON + ["train.steps=3", "train.cuda_graphs=true"]), tmp_path / "graphs")
    assert keys(tmp_path / "graphs") == keys(tmp_path / "plain")
    assert graphs["timing"]["compile_s"] > 0 and graphs["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-3)
    assert [json.loads((tmp_path / run / "run.json").read_text())["compiled"]
            for run in ("plain", "compiled", "graphs")] == ["none", "blocks", "graphs"]


def test_graphs_are_decided_per_run_and_hold_training_steps_only():
    """train.cuda_graphs unset: graphs for a small model trained by one process on CUDA with
    compilation on, nowhere else; forced on with several processes it is refused by name. The
    graphed forward serves training mode only: evaluation (other shapes, no gradients) is eager."""
    from testbed.errors import ConfigError
    from testbed.model.transformer import Transformer
    from testbed.plan import resolved_model

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    small, large = 3_000_000, dev.GRAPH_MAX_PARAMS
    assert dev.use_graphs(None, cuda, 1, small, compiled=True, checkpointing=False) is True
    assert dev.use_graphs(None, cuda, 1, large, compiled=True, checkpointing=False) is False
    assert dev.use_graphs(None, cuda, 2, small, compiled=True, checkpointing=False) is False
    assert dev.use_graphs(None, cuda, 1, small, compiled=False, checkpointing=False) is False
    assert dev.use_graphs(None, cuda, 1, small, compiled=True, checkpointing=True) is False
    assert dev.use_graphs(None, cpu, 1, small, compiled=True, checkpointing=False) is False
    assert dev.use_graphs(False, cuda, 1, small, compiled=True, checkpointing=False) is False
    assert dev.use_graphs(True, cpu, 1, small, compiled=True, checkpointing=False) is True
    with pytest.raises(ConfigError, match="train.cuda_graphs=true with 2 processes"):
        dev.use_graphs(True, cuda, 2, small, compiled=True, checkpointing=False)
    for bad, field in ((["train.compile=false"], "train.compile=false"),
                       (["train.activation_checkpointing=true"], "activation_checkpointing")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, COMMON + ["train.cuda_graphs=true", *bad])

    model = Transformer(resolved_model(load_config(None, COMMON)))
    calls = []
    model.graphed_hidden = lambda idx: calls.append(idx.shape) or model.hidden(idx)
    idx = torch.zeros(2, 8, dtype=torch.long)
    model.train()
    trained = model(idx, idx)
    model.eval()
    with torch.no_grad():
        evaluated = model(idx, idx)
    assert calls == [idx.shape] and torch.allclose(trained, evaluated)
