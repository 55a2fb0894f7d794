"""Run a study's sweeps through the sweep registry, then analyse them into a report.

OUT/study.json    which study, version and size this folder holds, each invocation's start and time (none:
                  interrupted) beside `study plan`'s estimate of it, and the study corpora it read
OUT/study.lock    fcntl lock held while study.json is read-modified-written (two `study run` at once keep both)
OUT/sweep/NAME/   one sweep directory per sweep of the study (docs/sweep.md)
OUT/report.md     claim, measurement with interval, verdict, caveat, wall time of the runs
OUT/figures.json  the same as data
OUT/*.png         the study's plots
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.rundir import read_json, write_json_atomic, write_text_atomic
from testbed.study.base import SIZES, STUDIES, Analysis, Context, Study
from testbed.study.sweeps import run_sweep


def load(imports: list[str] | tuple[str, ...] = ()) -> None:
    """Import the built-in studies and the modules named by --import."""
    import testbed.study.builtin  # noqa: F401  (registers the built-in studies)
    from testbed.registry import import_modules

    import_modules(imports, "--import")


def sweep_dirs(out: Path) -> dict[str, Path]:
    """The study's sweep folders by sweep name."""
    root = out / "sweep"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "sweep.json").is_file()}


def run(name: str, size: str, out: str | Path, workers: int = 1, progress: bool = False,
        log=print) -> dict[str, Any]:
    """Train every run of the study not yet done, then write the report."""
    from testbed.study import bracket, corpus
    from testbed.sweep.local import ForkServers
    from testbed.sweep.spec import load_sweep

    study: Study = STUDIES.get(name)
    if size not in study.sizes:
        raise TestbedError(f"--size {size!r} is not defined for study {name!r}; choose one of "
                           f"{', '.join(study.sizes)}")
    out = Path(out)
    _claim_folder(out, study, size)  # a folder holding another study is refused before anything is written
    specs = study.sweeps(size)
    # Recorded before anything slow: an invocation killed midway stays listed, its time unknown.
    # Another `study run` on this --out may record its own meanwhile: each change re-reads
    # study.json under the lock and touches this invocation's record only (found by its id).
    started = time.time()
    invocation: dict[str, Any] = {"id": uuid.uuid4().hex[:12], "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "wall_s": None}
    with _study_json(out, study, size) as meta:
        meta.setdefault("invocations", []).append(invocation)
    try:
        # What `extra` trains may read corpora the sweeps do not (vocab's profiles): all prepared first.
        corpus.ensure_for(specs + (study.extra_cost(size) if study.extra_cost else []))
        brackets = study.brackets_at(size)
        for spec in specs:
            load_sweep(spec)  # every run of every sweep is validated before any is trained
            if spec["name"] in brackets:
                bracket.check(brackets[spec["name"]], spec)
        # The plan's time for this invocation (every run, done or not, at the size's rates),
        # recorded beside the measured wall time so the estimate is checked against the run.
        estimate = plan(name, size)
        invocation.update(estimate_s=round(estimate["seconds"], 1), estimate_flops=estimate["flops"],
                          estimate_runs=estimate["runs"])
        corpora = _corpora(specs)
        with _study_json(out, study, size) as meta:
            meta["corpora"] = corpora
    except TestbedError:  # refused before training: not an interrupted invocation
        with _study_json(out, study, size) as meta:
            meta["invocations"] = [c for c in meta.get("invocations", []) if c.get("id") != invocation["id"]]
        raise
    done_before = _done_runs(out)
    dirs = {}
    servers = ForkServers(out / "logs")  # each slot imports torch once for the whole study
    try:
        for spec in specs:
            with wandb_tags(f"study:{study.name}", f"arm:{spec['name']}"):
                options = {"workers": workers, "progress": progress, "log": log, "servers": servers}
                if spec["name"] in brackets:
                    dirs[spec["name"]] = bracket.run_bracketed(out, spec, brackets[spec["name"]], **options)
                else:
                    dirs[spec["name"]] = run_sweep(out, spec, **options)
        if study.extra is not None:
            with wandb_tags(f"study:{study.name}"):
                study.extra(Context(out, size, dirs), {"workers": workers, "servers": servers})
    finally:
        servers.close()
    invocation.update(wall_s=round(time.time() - started, 2), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                      trained_runs=_done_runs(out) - done_before)
    with _study_json(out, study, size) as meta:
        calls = meta.setdefault("invocations", [])
        mine = [n for n, c in enumerate(calls) if c.get("id") == invocation["id"]]
        if mine:
            calls[mine[0]] = invocation
        else:  # removed by hand meanwhile: recorded again rather than lost
            calls.append(invocation)
    return report(out)


def _done_runs(out: Path) -> int:
    """How many runs (branches included) under the study's folder are done."""
    from testbed.rundir import find_runs

    root = out / "sweep"
    return sum(run.read_status().get("state") == "done" for run in find_runs(root)) if root.is_dir() else 0


def _corpora(specs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The prepared study corpora the sweeps read, by folder name: tokens, bytes, documents and
    fingerprint from each manifest, with its `corpus` block (what was read, how many files, the
    content hash) where it has one."""
    from testbed.data.shards import read_manifest
    from testbed.study import corpus

    found = {}
    for path in corpus.spec_paths(specs):
        if corpus.parse(path) is None or not (Path(path) / "manifest.json").is_file():
            continue
        manifest = read_manifest(path)
        found[Path(path).name] = {
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "validation_tokens": manifest["splits"]["validation"]["tokens"],
            "bytes": manifest["bytes"], "documents": manifest["documents"],
            "fingerprint": manifest["fingerprint"], **({"corpus": manifest["corpus"]} if "corpus" in manifest else {})}
    return found


@contextlib.contextmanager
def wandb_tags(*tags: str) -> Iterator[None]:
    """WANDB_TAGS (comma-separated, testbed/train/metrics.py) with `tags` added, for the trainers
    started inside the block; as it was after it."""
    before = os.environ.get("WANDB_TAGS")
    have = [t.strip() for t in (before or "").split(",") if t.strip()]
    os.environ["WANDB_TAGS"] = ",".join(dict.fromkeys([*have, *tags]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WANDB_TAGS", None)
        else:
            os.environ["WANDB_TAGS"] = before


def plan(name: str, size: str, rate: float | None = None) -> dict[str, Any]:
    """What `study run` would train, without training: per sweep the runs, tokens and FLOPs, the
    time (each run's FLOPs at `rate` FLOP/s, else at recipes.rate for its width, plus the per-run
    overhead), and whether every run's fresh tokens fit the corpus it reads."""
    from testbed.study import bracket, corpus, recipes
    from testbed.sweep.spec import load_sweep

    study: Study = STUDIES.get(name)
    if size not in study.sizes:
        raise TestbedError(f"--size {size!r} is not defined for study {name!r}; choose one of "
                           f"{', '.join(study.sizes)}")
    specs = study.sweeps(size) + (study.extra_cost(size) if study.extra_cost else [])
    brackets = study.brackets_at(size)
    rows, problems = [], []
    held_by_path: dict[str, tuple[int, bool]] = {}  # each corpus is counted (or estimated) once
    for spec in specs:
        sweep = load_sweep(_stated_vocabulary(spec))
        quantities = [run.quantities for run in sweep.runs]
        available = None
        for run, q in zip(sweep.runs, quantities):
            path = run.config.data.path
            if not path or corpus.parse(path) is None:
                continue
            if path not in held_by_path:
                held_by_path[path] = corpus.train_tokens(path)
            held = held_by_path[path][0]
            available = held if available is None else min(available, held)
            fresh = q["unique_tokens"] or q["planned_tokens"]
            if fresh > held:
                problems.append(f"sweep {sweep.name}: run {run.run_id} needs {fresh:,} distinct training "
                                f"tokens but {Path(path).name} holds {held:,}")
        fresh = max(q["unique_tokens"] or q["planned_tokens"] for q in quantities)
        flops = sum(q["planned_flops"] for q in quantities)
        seconds = sum(q["planned_flops"] / (rate or recipes.rate(size, q["d_model"])) + recipes.RUN_OVERHEAD_S[size]
                      for q in quantities)
        row = {"sweep": sweep.name, "runs": len(quantities),
               "tokens": sum(q["planned_tokens"] for q in quantities), "flops": flops,
               "largest_fresh_tokens": fresh, "corpus_tokens": available, "seconds": seconds}
        if sweep.name in brackets:
            # Beyond the grid only where a cell's optimum lands at its edge: not in the total, which
            # is what the study trains when every cell is bracketed; the most it can add, apart.
            added = bracket.most_added(spec, brackets[sweep.name])
            row.update(bracket_runs_at_most=added, bracket_seconds_at_most=added * seconds / len(quantities))
        rows.append(row)
    startup = recipes.STARTUP_S[size]
    total = startup + sum(r["seconds"] for r in rows)
    if total > recipes.BUDGET_S[size]:
        problems.append(f"{total:.0f} s exceeds the {size} budget of {recipes.BUDGET_S[size]} s")
    return {"study": name, "size": size, "rate": rate, "budget_s": recipes.BUDGET_S[size],
            "sweeps": rows, "seconds": total, "startup_s": startup, "problems": problems,
            "runs": sum(r["runs"] for r in rows), "flops": sum(r["flops"] for r in rows),
            "unprepared": [path for path, (_, prepared) in held_by_path.items() if not prepared]}


def _stated_vocabulary(spec: dict[str, Any]) -> dict[str, Any]:
    """For planning only: a sweep whose base reads a study corpus not yet prepared, with no
    model.vocab_size of its own, gets the vocabulary the corpus folder's name gives, so `study
    plan` works on a fresh clone (it names the corpus to prepare). The runs `study run` trains
    keep their configs."""
    from testbed.study import corpus

    base = spec.get("base") or {}
    path = (base.get("data") or {}).get("path")
    model = base.get("model") or {}
    if not path or model.get("vocab_size") or (Path(path) / "manifest.json").is_file():
        return spec
    args = corpus.parse(path)
    if args is None:
        return spec
    return {**spec, "base": {**base, "model": {**model, "vocab_size": args["vocab_size"]}}}


@contextlib.contextmanager
def _study_json(out: Path, study: Study, size: str) -> Iterator[dict[str, Any]]:
    """OUT/study.json, read afresh under OUT/study.lock (the way the sweep registry locks its
    records) and written back when the block ends without an error: two `study run` on one --out
    never write over each other's invocations. A folder holding another study is refused; a new
    one is claimed for this study."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "study.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            meta = _claim_folder(out, study, size)
            yield meta
            write_json_atomic(out / "study.json", meta)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _claim_folder(out: Path, study: Study, size: str) -> dict[str, Any]:
    path = out / "study.json"
    meta = read_json(path) if path.is_file() else None
    if meta:
        held = (meta.get("study"), meta.get("version"), meta.get("size"))
        if held != (study.name, study.version, size):
            raise TestbedError(f"--out {str(out)!r} holds study {held[0]!r} v{held[1]} at size "
                               f"{held[2]!r}, not {study.name!r} v{study.version} at {size!r}; "
                               f"choose another --out")
        return meta
    return {"study": study.name, "version": study.version, "size": size, "module": study.module}


def report(out: str | Path, imports: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Analyse the finished runs under `out` (nothing is trained) and write the report."""
    out = Path(out)
    meta = read_json(out / "study.json") if (out / "study.json").is_file() else None
    if not meta:
        raise TestbedError(f"{str(out)!r} holds no study.json; give the --out of `testbed study run`")
    if meta.get("study") not in STUDIES and meta.get("module"):
        load([meta["module"]])
    study: Study = STUDIES.get(meta["study"])
    size = meta["size"]
    if meta.get("version") != study.version:
        # Each version has its own recipe and analysis: another version's report would be mislabelled.
        raise TestbedError(f"{str(out)!r} holds study {study.name!r} v{meta.get('version')}, but this testbed "
                           f"defines v{study.version} ({study.changes or 'a new recipe'}); run `testbed study run "
                           f"{study.name} --size {size} --out NEW` for v{study.version}, or report this folder with "
                           f"the testbed that made it")
    context = Context(out, size, sweep_dirs(out))
    analysis: Analysis = study.analyse(context)
    verdict, why = study.verdict(analysis)
    caveats = sum(1 for m in [analysis.headline, *analysis.more] if m.caveat)
    if caveats:
        why += f"; {caveats} figure(s) carry a caveat (named beside each), and no rule decides on them"
    headline = verdict
    if size == "tiny":
        headline = "inconclusive (tiny)"
        why = f"tiny runs check the mechanics only; at this size the rule gives '{verdict}': {why}"
    runs, wall = _run_walls(out / "sweep")
    figures = {
        "study": study.name, "version": study.version, "size": size, "paper": study.paper,
        "claim": study.claim, "changes": study.changes, "measured": analysis.headline.as_dict(),
        "more": [m.as_dict() for m in analysis.more], "verdict": headline, "rule_verdict": verdict,
        "why": why, "caveat": study.caveat, "runs": runs, "runs_wall_s": round(wall, 2),
        "invocations": meta.get("invocations", []), "corpora": meta.get("corpora", {}), "tables": analysis.tables,
        "plots": analysis.plots, "notes": analysis.notes,
    }
    write_json_atomic(out / "figures.json", json.loads(json.dumps(figures, default=_plain)))
    write_text_atomic(out / "report.md", render(figures))
    return figures


def publish(out: str | Path, dest: str | Path) -> Path:
    """The study folder's report as DEST/NAME.md, headed by how it was made (the command, the
    machine, the wall time), with its plots copied beside it as NAME-PLOT.png."""
    import platform
    import shutil

    out, dest = Path(out), Path(dest)
    figures = read_json(out / "figures.json")
    if figures is None:
        raise TestbedError(f"{str(out)!r} holds no figures.json; run `testbed study report {out}` first")
    name, size = figures["study"], figures["size"]
    dest.mkdir(parents=True, exist_ok=True)
    body = (out / "report.md").read_text()
    for plot in figures.get("plots") or []:
        shutil.copyfile(out / plot, dest / f"{name}-{plot}")
        body = body.replace(f"]({plot})", f"]({name}-{plot})")
    header = [
        f"Command: `testbed study run {name} --size {size} --out OUT`, then `testbed study report OUT "
        f"--publish {dest}`.",
        "",
        f"Machine: {_machine()}; Python {platform.python_version()}.",
        "",
        f"Wall time: {invocations_text(figures.get('invocations') or [])}; "
        f"{figures['runs_wall_s'] / 60:.1f} min inside the {figures['runs']} runs.",
        "",
    ]
    title, rest = body.split("\n", 1)
    path = dest / f"{name}.md"
    write_text_atomic(path, "\n".join([title, "", *header]) + rest)
    return path


def _machine() -> str:
    import os

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores" + (f" ({model})" if model else "")


def _plain(value: Any) -> Any:
    try:
        return value.item()  # numpy scalars
    except AttributeError:
        return str(value)


def _run_walls(root: Path) -> tuple[int, float]:
    """Number of runs (branches included) and the sum of their wall times (run.json summary)."""
    from testbed.rundir import find_runs

    runs = find_runs(root) if root.is_dir() else []
    wall = 0.0
    for run in runs:
        timing = ((run.read_run() or {}).get("summary") or {}).get("timing") or {}
        wall += float(timing.get("wall_s") or 0.0)
    return len(runs), wall


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(empty)\n"
    keys = list(rows[0])

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def invocations_text(calls: list[dict[str, Any]]) -> str:
    """The `study run` time as recorded: finished invocations summed (data preparation included);
    one killed midway (or still running) never recorded its end, and is named as such."""
    finished = [c for c in calls if c.get("wall_s") is not None]
    text = (f"{sum(c['wall_s'] for c in finished) / 60:.1f} min for `study run` ({len(finished)} finished "
            f"invocation(s), data preparation included)")
    unfinished = len(calls) - len(finished)
    if unfinished:
        text += f" and {unfinished} interrupted invocation(s), whose time is not recorded"
    if finished and not unfinished and all(c.get("trained_runs") == 0 for c in finished):
        # A folder of runs trained elsewhere (an earlier version's, re-analysed): its time is
        # only the analysis'; the time inside the runs, which follows, is the training's.
        text += ", which trained no run: every run was trained before this folder's first `study run`"
    return text


def _last_invocation(calls: list[dict[str, Any]]) -> str:
    """The latest `study run` alone (the published header sums them all), beside the plan's
    estimate for it (every run of the study, so a resumed invocation takes less)."""
    if not calls:
        return ""
    last = calls[-1]
    if last.get("wall_s") is None:
        return "; the last `study run` was interrupted"
    estimate = (f" (`study plan` estimated {last['estimate_s']:.0f} s for all {last['estimate_runs']} runs)"
                if last.get("estimate_s") is not None else "")
    return f"; the last `study run` took {last['wall_s']:.1f} s{estimate}"


def _corpus_lines(corpora: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, c in corpora.items():
        text = (f"Corpus `{name}`: {c['train_tokens']:,} training and {c['validation_tokens']:,} validation "
                f"tokens, {c['bytes']:,} bytes in {c['documents']:,} documents")
        made = c.get("corpus")
        if made:
            text += (f"; {made['kind']} of Python {made['python']}: {made['files']:,} distinct files "
                     f"({made['duplicates_dropped']:,} duplicates dropped), content sha256 "
                     f"{made['content_sha256'][:16]}, made in {made['build_s']:.0f} s")
        lines += [text + ".", ""]
    return lines


def render(f: dict[str, Any]) -> str:
    import math

    from testbed.study.base import Measurement

    def text(m: dict[str, Any]) -> str:
        measured = m["value"] is not None and math.isfinite(m["value"])  # else text() says how already
        return Measurement(**m).text() + (f" — {m['how']}" if m.get("how") and measured else "")

    calls = f.get("invocations") or []
    lines = [
        f"# Study `{f['study']}` (v{f['version']}, size {f['size']})", "",
        f"**Paper.** {f['paper']}", "",
        f"**Claim.** {f['claim']}", "",
        *([f"**Changed since v{f['version'] - 1}.** {f['changes']}", ""] if f.get("changes") else []),
        f"**Measured.** {text(f['measured'])}", "",
        *[f"- {text(m)}" for m in f["more"]], "",
        f"**Verdict: {f['verdict']}.** {f['why']}", "",
        f"**Why it might disagree.** {f['caveat']}", "",
        f"**Runs.** {f['runs']} runs, {f['runs_wall_s']:.1f} s of training wall time in all"
        + _last_invocation(calls) + ".", "",
        *_corpus_lines(f.get("corpora") or {}),
    ]
    for note in f.get("notes") or []:
        lines += [f"Note: {note}", ""]
    for name, rows in (f.get("tables") or {}).items():
        lines += [f"## {name}", "", _table(rows)]
    for plot in f.get("plots") or []:
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


__all__ = ["SIZES", "load", "plan", "report", "run", "run_sweep"]
