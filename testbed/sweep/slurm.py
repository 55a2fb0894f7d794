"""Run a sweep on SLURM: site profiles, batch scripts from templates, submission, waiting.

Runs are packed `pack` per array task and trained inside the task, `runs_per_gpu` at a time
(packed_per_task): one after another, or several at once sharing the task's GPU as separate
trainer processes, each with its share of the GPU's memory, optionally under CUDA MPS (profile
`mps: true`). The scripts come from the templates shipped beside this module: templates/array.sbatch (one node
per task) or templates/multinode.sbatch (profile `nodes` > 1: srun + torchrun over the
allocation). Values from the sweep (paths, run ids) are written with shlex.quote; profile
values that land in `#SBATCH` lines must be plain words.

Submission holds the registry lock from choosing the runs until their job ids are recorded, so
two submitters never queue the same run. A run preempted and requeued by SLURM stays with its
job; it is only resubmitted once that job has left the queue.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed import exits
from testbed.config import read_yaml
from testbed.errors import ConfigError, TestbedError
from testbed.sweep.registry import ACTIVE, Registry, eligible, now

# Package data beside this module, so an installed wheel renders scripts without a checkout.
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
REQUIRED = ("partition", "time", "cpus_per_task", "mem")
DEFAULTS: dict[str, Any] = {
    "account": None,
    "qos": None,
    "gpus_per_task": 0,  # GPUs of a one-node task (also the per-node count of a multi-node run)
    "nodes": 1,
    "setup": [],  # shell lines run before training (module load, source venv/bin/activate, ...)
    "max_concurrent": None,  # array tasks running at once (the %N of --array)
    "signal_seconds": 300,  # USR1 this long before the time limit: time to save and requeue
    "python": None,  # interpreter on the compute nodes; default: the one submitting
    "port": 29500,  # torchrun rendezvous port base (multi-node)
    "extra_sbatch": [],  # more `--option=value` lines, e.g. --constraint=h100
    "runs_per_gpu": "auto",  # runs trained at once on a task's GPU: a whole number, or auto
    "gpu_memory_gb": None,  # memory of the partition's GPUs, for runs_per_gpu: auto (None: 1 run)
    "mps": False,  # start a CUDA MPS control daemon in each task that packs several runs
}
PLAIN_WORD = re.compile(r"[A-Za-z0-9_.,:@+=%/-]+")


# ----------------------------------------------------------------------------- profiles


def load_profile(path: str | Path) -> dict[str, Any]:
    raw = read_yaml(path)
    where = f"SLURM profile {str(path)!r}"
    for key in raw:
        if key not in REQUIRED and key not in DEFAULTS:
            import difflib

            near = difflib.get_close_matches(key, [*REQUIRED, *DEFAULTS], n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join([*REQUIRED, *DEFAULTS])}"
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}")
    for key in REQUIRED:
        if raw.get(key) in (None, ""):
            raise ConfigError(f"{where} is missing the required field {key!r}; add e.g. "
                              f"{key}: {example_value(key)}")
    profile = {**DEFAULTS, **raw}
    for key in ("partition", "time", "mem", "account", "qos"):
        value = profile[key]
        if value is not None and not PLAIN_WORD.fullmatch(str(value)):
            raise ConfigError(f"{where}: {key}={value!r} must be a plain word (letters, digits, "
                              f"_ . , : @ + = % / -); remove spaces and quotes")
    for key in ("cpus_per_task", "gpus_per_task", "nodes", "signal_seconds", "port"):
        value = profile[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: {key}={value!r} must be a whole number >= 0")
    if profile["cpus_per_task"] < 1 or profile["nodes"] < 1:
        raise ConfigError(f"{where}: cpus_per_task and nodes must be at least 1")
    mc = profile["max_concurrent"]
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
        raise ConfigError(f"{where}: max_concurrent={mc!r} must be a whole number >= 1 or null")
    from testbed.sweep.spec import runs_per_gpu_setting

    profile["runs_per_gpu"] = runs_per_gpu_setting(profile["runs_per_gpu"], where)
    memory = profile["gpu_memory_gb"]
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                               or memory <= 0):
        raise ConfigError(f"{where}: gpu_memory_gb={memory!r} must be a number > 0 (e.g. 80 for an "
                          f"H100) or null")
    if not isinstance(profile["mps"], bool):
        raise ConfigError(f"{where}: mps={profile['mps']!r} must be true or false")
    for key in ("setup", "extra_sbatch"):
        if not isinstance(profile[key], list) or not all(isinstance(x, str) for x in profile[key]):
            raise ConfigError(f"{where}: {key}={profile[key]!r} must be a list of strings")
    for option in profile["extra_sbatch"]:
        if not re.fullmatch(r"--[a-z][a-z-]*(=[A-Za-z0-9_.,:@+=%/-]+)?", option):
            raise ConfigError(f"{where}: extra_sbatch entry {option!r} must look like "
                              f"--option=value with a plain-word value")
    return profile


def example_value(key: str) -> str:
    return {"partition": "gpu", "time": "04:00:00", "cpus_per_task": "8", "mem": "64G"}.get(key, "...")


# ----------------------------------------------------------------------------- scripts


def pack_runs(run_ids: list[str], pack: int) -> list[list[str]]:
    pack = max(1, pack)
    return [run_ids[i:i + pack] for i in range(0, len(run_ids), pack)]


def packed_per_task(profile: dict[str, Any], sweep: Any = None,
                    override: int | str | None = None) -> int:
    """Runs trained at once in one array task: the command line's setting, else the sweep
    file's integer, else the profile's; auto is resolved against the profile's gpu_memory_gb
    (1 without it). A multi-node run has its allocation to itself; a task of several GPUs
    runs one process per run on its first GPU only, so it is not packed (refused if asked)."""
    from testbed.sweep.spec import choose_runs_per_gpu, runs_per_gpu_setting

    setting = runs_per_gpu_setting(override) if override is not None else "auto"
    if setting == "auto" and sweep is not None:
        setting = sweep.runs_per_gpu
    if setting == "auto":
        setting = profile.get("runs_per_gpu", "auto")
    if profile["nodes"] > 1 or profile["gpus_per_task"] > 1:
        if setting != "auto" and int(setting) > 1:
            raise ConfigError(f"runs_per_gpu={setting} packs runs onto one GPU; the profile gives "
                              f"each task nodes={profile['nodes']}, gpus_per_task="
                              f"{profile['gpus_per_task']}: use gpus_per_task: 1 and nodes: 1")
        return 1
    if setting == "auto" and not profile["gpus_per_task"]:
        return 1  # CPU tasks: only an explicit setting packs them
    memory = profile.get("gpu_memory_gb")
    configs = [r.config for r in sweep.runs] if sweep is not None else []
    quantities = [r.quantities for r in sweep.runs] if sweep is not None else None
    return choose_runs_per_gpu(setting, configs, int(memory * 1e9) if memory else None,
                               quantities=quantities)


def mps_lines(profile: dict[str, Any], runs_per_gpu: int) -> str:
    """Shell lines starting a CUDA MPS control daemon for this task (profile mps: true, and
    several runs per GPU), stopped when the script exits: its pipe and log folders are the
    task's own, so two tasks on one node never share a daemon."""
    if not profile.get("mps") or runs_per_gpu < 2:
        return ""
    return "\n".join([
        "# CUDA MPS (profile mps: true): the packed trainers share the GPU through one server.",
        'export CUDA_MPS_PIPE_DIRECTORY="${TMPDIR:-/tmp}/mps-pipe-$SELF"',
        'export CUDA_MPS_LOG_DIRECTORY="${TMPDIR:-/tmp}/mps-log-$SELF"',
        'mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"',
        "if nvidia-cuda-mps-control -d; then",
        "    trap 'echo quit | nvidia-cuda-mps-control' EXIT",
        "else",
        '    echo "CUDA MPS did not start; the packed runs share the GPU without it" >&2',
        "fi",
    ])


def render_script(sweep_name: str, sweep_dir: Path, tasks: list[list[str]],
                  profile: dict[str, Any], trainer: list[str] | None = None,
                  runs_per_gpu: int = 1) -> str:
    from testbed.sweep.local import memory_fraction

    multinode = profile["nodes"] > 1
    runs_per_gpu = 1 if multinode else max(1, runs_per_gpu)
    template = (TEMPLATES_DIR / ("multinode.sbatch" if multinode else "array.sbatch")).read_text()
    python = profile["python"] or sys.executable
    array = f"0-{len(tasks) - 1}"
    if profile["max_concurrent"]:
        array += f"%{profile['max_concurrent']}"
    options = [f"--partition={profile['partition']}", f"--time={profile['time']}",
               f"--cpus-per-task={profile['cpus_per_task']}", f"--mem={profile['mem']}"]
    if profile["account"]:
        options.append(f"--account={profile['account']}")
    if profile["qos"]:
        options.append(f"--qos={profile['qos']}")
    if profile["gpus_per_task"]:
        key = "--gpus-per-node" if multinode else "--gpus-per-task"
        options.append(f"{key}={profile['gpus_per_task']}")
    options += profile["extra_sbatch"]
    cases = "\n".join(f"    {i}) RUNS=({' '.join(shlex.quote(r) for r in runs)}) ;;"
                      for i, runs in enumerate(tasks))
    values = {
        "job_name": re.sub(r"[^A-Za-z0-9_.-]", "_", sweep_name)[:64],
        "array": array,
        "signal_seconds": str(profile["signal_seconds"]),
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in options),
        "sweep_dir": shlex.quote(str(sweep_dir)),
        "sweep_name": shlex.quote(sweep_name),  # the trainers' WANDB_RUN_GROUP
        "python": shlex.quote(str(python)),
        "setup": "\n".join(profile["setup"]),
        "task_cases": cases,
        "launch": launch_command(profile, trainer),
        "nodes": str(profile["nodes"]),
        "port": str(profile["port"]),
        "exit_done": str(exits.DONE),
        "exit_skip": str(exits.SKIP),
        "exit_preempted": str(exits.PREEMPTED),
        "exit_busy": str(exits.BUSY),
        "runs_per_gpu": str(runs_per_gpu),
        "memory_fraction": memory_fraction(runs_per_gpu),
        "threads_per_run": str(max(1, profile["cpus_per_task"] // runs_per_gpu)),
        "mps_start": mps_lines(profile, runs_per_gpu),
    }
    return fill_template(template, values)


def fill_template(template: str, values: dict[str, str]) -> str:
    """Every `{{name}}` replaced in one pass: a value that itself holds `{{...}}` (a sweep
    directory named so, a setup line) is written as it is, never filled in turn."""

    def fill(match: re.Match) -> str:
        name = match.group(1)
        assert name in values, f"template placeholder {match.group()} has no value"
        return values[name]

    return re.sub(r"\{\{(\w+)\}\}", fill, template)


def launch_command(profile: dict[str, Any], trainer: list[str] | None) -> str:
    """The trainer invocation (followed in the script by CONFIG --run-dir DIR)."""
    if trainer:
        return " ".join('"$PYTHON"' if w == "{python}" else shlex.quote(w) for w in trainer)
    if profile["nodes"] > 1:
        gpus = max(1, profile["gpus_per_task"])
        return ('srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run '
                f'--nnodes "$SLURM_NNODES" --nproc_per_node {gpus} --rdzv_backend c10d '
                '--rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SELF" -m testbed train')
    return '"$PYTHON" -m testbed train'


# ----------------------------------------------------------------------------- the queue


def require_slurm() -> None:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise TestbedError("--executor slurm needs sbatch and squeue on PATH; run on a SLURM "
                           "login node, or start the local test cluster (scripts/slurm_cluster.sh "
                           "start) and export SLURM_CONF")


def live_jobs() -> set[str]:
    """Ids of queued or running jobs, array tasks as ARRAYJOB_TASK (plus pending ranges)."""
    result = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
    if result.returncode != 0:
        raise TestbedError(f"squeue failed ({result.stderr.strip()}); check that the SLURM "
                           f"controller is reachable")
    return {line.strip() for line in result.stdout.splitlines() if line.strip()}


def submit(registry: Registry, sweep_name: str, run_ids: list[str], profile: dict[str, Any], *,
           pack: int = 1, max_retries: int = 2, trainer: list[str] | None = None,
           runs_per_gpu: int = 1) -> list[str]:
    """Queue every startable run of `run_ids`; returns the run ids submitted (maybe none).
    Each task gets at least `runs_per_gpu` runs, trained that many at a time."""
    require_slurm()
    pack = max(pack, runs_per_gpu)
    if profile["nodes"] > 1:
        pack = runs_per_gpu = 1  # a multi-node run occupies its whole allocation
    with registry.locked():
        live = live_jobs()
        registry.reconcile_locked(live)
        chosen = [r for r in run_ids if (rec := registry.read(r)) and eligible(rec, max_retries, live)
                  and not registry.is_done(r)]
        if not chosen:
            return []
        tasks = pack_runs(chosen, pack)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = registry.root / "slurm"
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        registry.logs_dir.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.glob("submit-*.sbatch")))
        script_path = folder / f"submit-{n:04d}-{stamp}.sbatch"
        script_path.write_text(render_script(sweep_name, registry.root, tasks, profile, trainer,
                                             runs_per_gpu=runs_per_gpu))
        result = subprocess.run(["sbatch", "--parsable", str(script_path)], cwd=registry.root,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise TestbedError(f"sbatch refused {str(script_path)!r}: {result.stderr.strip()}; "
                               f"fix the SLURM profile (partition, account, qos, limits)")
        array_job = result.stdout.strip().split(";")[0]
        for task, runs in enumerate(tasks):
            for run_id in runs:
                record = registry.read(run_id)
                assert record is not None  # chosen (read) above, under the same lock
                registry.set_state(record, "submitted", None, executor="slurm",
                                   job_id=f"{array_job}_{task}", array_job=array_job,
                                   script=str(script_path), submitted_at=now())
                registry.write(record)
        return chosen


def wait(registry: Registry, sweep_name: str, run_ids: list[str], profile: dict[str, Any], *,
         pack: int = 1, max_retries: int = 2, poll_seconds: float = 5.0,
         trainer: list[str] | None = None, on_poll: Any = None,
         runs_per_gpu: int = 1) -> dict[str, int]:
    """Wait until no run is queued; resubmit failed (within retries) and stranded runs."""
    while True:
        records = registry.reconcile(live_jobs)
        mine = [r for r in records if r["run_id"] in set(run_ids)]
        if on_poll:
            on_poll(mine)
        live = live_jobs()
        busy = [r for r in mine if r.get("state") in ACTIVE or r.get("job_id") in live]
        if not busy:
            if not submit(registry, sweep_name, run_ids, profile, pack=pack,
                          max_retries=max_retries, trainer=trainer, runs_per_gpu=runs_per_gpu):
                break
        time.sleep(poll_seconds)
    counts: dict[str, int] = {}
    for record in registry.records():
        if record["run_id"] in set(run_ids):
            counts[record["state"]] = counts.get(record["state"], 0) + 1
    return counts
