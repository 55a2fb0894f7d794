"""Run one sweep of a study through the sweep registry and the local executor, resumably."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.rundir import write_json_atomic


def vary_data_order(spec: dict[str, Any]) -> dict[str, Any]:
    """The sweep with `data.seed` following `train.seed` wherever the seed is an axis and the
    sweep does not set the data order itself: a study's seeds then vary the data order as well as
    the initialisation, so its intervals hold the data-order variance too (often the larger part
    at small scale)."""
    axes = {**(spec.get("grid") or {}), **(spec.get("zip") or {})}
    derived = spec.get("derived") or {}
    if "train.seed" not in axes or "data.seed" in axes or "data.seed" in derived:
        return spec
    return {**spec, "derived": {"data.seed": "train.seed", **derived}}


def run_sweep(out: Path, spec: dict[str, Any], workers: int = 1, progress: bool = False,
              log=print, servers: Any = None, accept_diverged: bool = False) -> Path:
    """Train every run of one sweep mapping not yet done, in OUT/sweep/NAME; returns that folder.
    `servers` (sweep.local.ForkServers): the study's fork servers, kept from sweep to sweep.
    `accept_diverged`: a run that diverged is an outcome, not a failure (an LR bracket's upper side,
    testbed.study.bracket); every other sweep stops on it."""
    from testbed.rundir import RunDir
    from testbed.sweep.local import LocalExecutor
    from testbed.sweep.registry import Registry
    from testbed.sweep.spec import load_sweep

    sweep = load_sweep(vary_data_order(spec))
    folder = out / "sweep" / sweep.name
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "sweep.json"
    if not marker.is_file():
        write_json_atomic(marker, {"name": sweep.name})
    registry = Registry(folder)
    ids = registry.add_runs(sweep)
    log(f"sweep {sweep.name}: {len(ids)} runs in {folder}")
    counts = LocalExecutor(registry, ids, workers=workers, progress=progress, servers=servers).run()
    if accept_diverged and counts.get("done", 0) != len(ids):
        diverged = sum(bool(RunDir(registry.run_dir(i)).read_status().get("diverged")) for i in ids)
        if diverged:
            log(f"sweep {sweep.name}: {diverged} run(s) diverged (a measured outcome: worse than any LR that trained)")
        counts = {**counts, "done": counts.get("done", 0) + diverged}
    if counts.get("done", 0) != len(ids):
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        raise TestbedError(f"sweep {sweep.name} ended with {summary}; see testbed sweep status "
                           f"{folder}, then run the study again to resume")
    return folder
