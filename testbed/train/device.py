"""The one switch between CPU and GPU: device, precision, autocast, peak FLOP/s.

Everything device-specific (CUDA, bf16, fused kernels, compile) is decided here, so the CPU
path runs exactly the same training logic as the GPU path.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings

import torch

from testbed.errors import ConfigError

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, without sparsity).
# Matched against torch.cuda.get_device_name(); the first key contained in the name wins, so
# more specific names come first. A device not listed reports MFU as unknown.
PEAK_BF16_FLOPS = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            device = torch.device("cuda", local % torch.cuda.device_count())
            share_gpu_memory(device)
            return device
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is visible; use train.device=cpu")
    if device.type == "cuda" and device.index is None:
        # Plain "cuda" means this process's GPU (torchrun's LOCAL_RANK), as auto does: an index
        # is needed by torch.cuda.set_device and the RNG calls.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if device.type == "cuda":
        share_gpu_memory(device)
    return device


def share_gpu_memory(device: torch.device) -> None:
    """TESTBED_GPU_MEMORY_FRACTION (set by a sweep packing several runs onto one GPU): this
    process's cap on the GPU's memory, so that the largest micro-batch search stays in its share."""
    fraction = os.environ.get("TESTBED_GPU_MEMORY_FRACTION")
    if fraction:
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(fraction)), device)


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: without them a CPU emulates bf16 matmuls, about 100x slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: assume not
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on CUDA, fp32 on CPU (exact, bit-reproducible).

    bf16 on a CPU is honoured, with a warning where the processor has no bf16 matrix units."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_units():
        warnings.warn("train.precision=bf16 on a CPU without AVX512-BF16 or AMX: bf16 matmuls are "
                      "emulated and far slower than fp32; use train.precision=fp32 here", stacklevel=2)
    return torch.bfloat16 if precision == "bf16" else torch.float32


def use_compile(setting: bool | None, device: torch.device) -> bool:
    """train.compile: None (the default) compiles on CUDA, where it pays for itself within a few
    steps, and not on a CPU, where compiling takes longer than most CPU runs train."""
    return device.type == "cuda" if setting is None else setting


# Below this many parameters a training step on a GPU is mostly kernel launches (the ladder's
# 1M-30M rungs; 124M already reaches 43% MFU with compiled blocks, docs/gpu/), which CUDA graphs
# replay at once. An assumption until scripts/bench_packing.py --graphs measures it.
GRAPH_MAX_PARAMS = 50_000_000


def use_graphs(setting: bool | None, device: torch.device, world: int, params: int,
               compiled: bool, checkpointing: bool) -> bool:
    """train.cuda_graphs: None (the default) captures the step of a small model (fewer than
    GRAPH_MAX_PARAMS parameters) trained by one process on CUDA with compilation on; True
    forces the whole-model compile (on a CPU it has no graphs to make: the same code path,
    testable there). Several processes use regional compilation: their collectives stay outside."""
    if setting is None:
        return (device.type == "cuda" and world == 1 and params < GRAPH_MAX_PARAMS and compiled
                and not checkpointing)
    if setting and world > 1:
        raise ConfigError(f"train.cuda_graphs=true with {world} processes: graphs capture one process's "
                           f"step; leave train.cuda_graphs unset (auto) or set it false")
    return setting


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s, the device name it matched) or (None, why it is unknown).

    TESTBED_PEAK_FLOPS overrides the table, e.g. with a measured CPU matmul peak."""
    override = os.environ.get("TESTBED_PEAK_FLOPS")
    if override:
        return float(override), "TESTBED_PEAK_FLOPS"
    if device.type != "cuda":
        return None, f"{device.type}: no peak table (set TESTBED_PEAK_FLOPS to a measured peak)"
    name = torch.cuda.get_device_name(device)
    if dtype != torch.bfloat16:
        return None, f"{name}: peaks are tabulated for bf16 only"
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value, key
    return None, f"{name}: not in the peak table"


def device_names() -> list[str]:
    """The table's devices as `sweep plan --device` spells them (h100, h100-pcie, a10g, ...)."""
    return [key.lower().replace(" ", "-") for key, _ in PEAK_BF16_FLOPS]


def named_peak(name: str) -> float | None:
    """The bf16 peak of a device named as device_names() spells it; None if not in the table."""
    for key, value in PEAK_BF16_FLOPS:
        if key.lower().replace(" ", "-") == name.lower():
            return value
    return None


def measure_matmul_peak(dtype: torch.dtype, device: torch.device = torch.device("cpu"),
                        seconds: float = 0.3, n: int = 1024) -> float:
    """Best FLOP/s of an n x n x n torch matmul at this precision on this device, with the
    threads the trainer gets: the practical peak, as the trainer will see it."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm up the thread pool (or the GPU's kernels)
    synchronize(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    except Exception:  # pragma: no cover - non-Linux
        return None
