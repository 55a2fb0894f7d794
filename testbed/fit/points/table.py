"""Load the points to fit: a sweep directory or any CSV/Parquet table, mapped to the law's names.

Every row dropped is counted by reason and the counts travel into the report; nothing is
dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from testbed.errors import TestbedError


@dataclass
class Points:
    frame: pd.DataFrame  # clean rows, canonical column names
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> number of rows
    warnings: list[str] = field(default_factory=list)
    run_column: str | None = None  # the table column that named the runs (None: one run per row)
    # rows in the table, and the rows each --points choice would keep (printed beside the fit,
    # so a choice that drops most of a table is seen where the fit is read)
    rows: dict = field(default_factory=dict)


RUN_COLUMNS = ("run_id", "run", "model", "name")  # detected in this order on outside tables


def parse_columns(spec: str | None) -> dict[str, str]:
    """`N=col,D=col,loss=col` -> {"N": "col", ...} (canonical name -> source column)."""
    mapping: dict[str, str] = {}
    if not spec:
        return mapping
    for item in spec.split(","):
        if "=" not in item:
            raise TestbedError(
                f"--columns item {item!r} is not NAME=COLUMN; write e.g. --columns N=params,loss=val_loss."
            )
        name, column = (part.strip() for part in item.split("=", 1))
        mapping[name] = column
    return mapping


def read_source(source: str | Path) -> pd.DataFrame:
    """A table file, or a sweep directory collected on the fly."""
    path = Path(source)
    if path.is_dir():
        from testbed.fit.points.collect import collect_runs

        return collect_runs(path)
    if not path.is_file():
        raise TestbedError(f"input {str(path)!r} does not exist; pass a sweep directory, a .csv or a .parquet file.")
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises its own types for a damaged file
            raise TestbedError(f"input {str(path)!r} is not a readable Parquet file ({type(err).__name__}: "
                               f"{err}); pass a table written by `testbed fit collect`.") from None
    elif path.suffix in (".csv", ".txt"):
        frame = read_csv(path)
    else:
        raise TestbedError(f"input {str(path)!r} has an unknown extension; use .csv or .parquet.")
    if frame.empty:
        raise TestbedError(f"input {str(path)!r} holds no rows; pass a table with a header and one row per point.")
    return frame


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV whose every row has the header's number of fields; an empty, binary or ragged file
    is one error naming the file (and the line)."""
    import csv
    import io

    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        text = ""
        if b"\0" not in data:
            raise TestbedError(f"input {str(path)!r} is not UTF-8 text (byte {err.start}); "
                               f"save the table as a UTF-8 CSV.") from None
    if "\0" in text or (not text and data):
        raise TestbedError(f"input {str(path)!r} is a binary file, not a CSV; pass a CSV or .parquet table.")
    rows = [(n, row) for n, row in enumerate(csv.reader(io.StringIO(text)), 1) if row]
    if not rows:
        raise TestbedError(f"input {str(path)!r} is empty; pass a table with a header and one row per point.")
    width = len(rows[0][1])
    for line, row in rows[1:]:
        if len(row) != width:
            raise TestbedError(f"input {str(path)!r} line {line} has {len(row)} fields but the header has "
                               f"{width}; fix that row so every row has one value per column.")
    try:
        return pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, ValueError) as err:
        raise TestbedError(f"input {str(path)!r} cannot be read as a CSV ({err}); fix the file.") from None


def apply_columns(frame: pd.DataFrame, mapping: dict[str, str]) -> pd.DataFrame:
    """Rename mapped columns to canonical names and derive D or C from C = 6 N D."""
    for name, column in mapping.items():
        if column not in frame.columns:
            raise TestbedError(
                f"--columns {name}={column}: the table has no column {column!r}; "
                f"use one of {', '.join(map(str, frame.columns))}."
            )
    frame = frame.copy()
    for name, column in mapping.items():
        frame[name] = frame[column]
    has = set(frame.columns)
    if "D" not in has and {"C", "N"} <= has:
        frame["D"] = pd.to_numeric(frame["C"], errors="coerce") / (6.0 * pd.to_numeric(frame["N"], errors="coerce"))
    if "C" not in has and {"N", "D"} <= has:
        frame["C"] = 6.0 * pd.to_numeric(frame["N"], errors="coerce") * pd.to_numeric(frame["D"], errors="coerce")
    run_column = next((c for c in RUN_COLUMNS if c in frame.columns), None)
    if run_column is None:
        frame["run_id"] = [f"row{i}" for i in range(len(frame))]  # each row is its own run
    else:
        frame["run_id"] = frame[run_column]
    frame["run_id"] = frame["run_id"].astype(str)
    frame.attrs["run_column"] = mapping.get("run_id", run_column)
    return frame


def add_run_fraction(frame: pd.DataFrame) -> pd.DataFrame:
    """`run_fraction`: how far into its run each point is (tokens over the run's planned or
    largest tokens; else steps, else X), so rules can select early or late checkpoints."""
    if "run_fraction" in frame.columns or frame.empty:
        return frame
    for column in ("D", "step", "X"):
        if column in frame.columns:
            position = pd.to_numeric(frame[column], errors="coerce")
            break
    else:
        return frame
    total = position.groupby(frame["run_id"]).transform("max")
    if column == "D" and "planned_tokens" in frame.columns:
        planned = pd.to_numeric(frame["planned_tokens"], errors="coerce")
        total = planned.where(planned > 0, total)
    frame = frame.copy()
    frame["run_fraction"] = (position / total).astype(float)
    return frame


def clean(frame: pd.DataFrame, needed: tuple[str, ...], positive: tuple[str, ...]) -> Points:
    """Keep rows where every needed column is a finite number (and positive where required)."""
    for name in needed:
        if name not in frame.columns:
            raise TestbedError(
                f"the table has no column {name!r}; map one with --columns {name}=COLUMN "
                f"(columns: {', '.join(map(str, frame.columns))})."
            )
    dropped: dict[str, int] = {}
    keep = np.ones(len(frame), dtype=bool)
    numeric = {}
    for name in needed:
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
        if len(values) and np.isnan(values).all():
            raise TestbedError(f"column {name!r} holds no numbers; map a numeric column with --columns {name}=COLUMN.")
        numeric[name] = values
        bad = ~np.isfinite(values) & keep
        if bad.any():
            dropped[f"{name} missing or not finite"] = int(bad.sum())
        keep &= np.isfinite(values)
    for name in positive:
        bad = keep & ~(numeric[name] > 0)
        if bad.any():
            dropped[f"{name} <= 0"] = int(bad.sum())
        keep &= numeric[name] > 0
    out = frame.loc[keep].copy()
    for name in needed:
        out[name] = numeric[name][keep]
    return Points(out.reset_index(drop=True), dropped)


POINT_CHOICES = ("final", "all", "ema", "average")
# Points that average weights instead of decaying the learning rate: only their own --points.
AVERAGED_KINDS = {"ema": "EMA", "average": "checkpoint-average"}


def select_points(points: Points, which: str = "final", skip_fraction: float = 0.1) -> Points:
    """Choose final/cooldown points only, or also intermediate checkpoints past the early cut;
    or, as the alternative to a cooldown, the EMA points (past the early cut) or the averaged
    checkpoints.

    An intermediate point in its schedule's decay phase (a cosine run's, say) is not the final
    loss of a shorter run, while a WSD cooldown branch's end is; the phase is the one the schedule
    declares (recorded with the checkpoint, or asked of the run's schedule by `testbed fit
    collect`), never guessed from the schedule's name. Mixing them is allowed but always reported.
    """
    frame, dropped, warnings = points.frame, dict(points.dropped), list(points.warnings)
    if which not in POINT_CHOICES:
        raise TestbedError(f"--points {which!r} is unknown; use {', '.join(POINT_CHOICES[:-1])} or average.")
    if not 0.0 <= skip_fraction < 1.0:
        raise TestbedError(f"--skip-fraction {skip_fraction} is outside [0, 1); give e.g. 0.1.")
    if "point_kind" not in frame.columns:
        if which in AVERAGED_KINDS:
            raise TestbedError(f"--points {which} needs a table from `testbed fit collect` (its point_kind "
                               f"column); this table has none: use --points final or all")
        return _select_outside(points, which, skip_fraction)
    averaged = frame["point_kind"].isin(list(AVERAGED_KINDS))
    if which in AVERAGED_KINDS:
        return _select_averaged(points, which, skip_fraction)
    for kind, name in AVERAGED_KINDS.items():
        count = int((frame["point_kind"] == kind).sum())
        if count:
            dropped[f"{name} points (use --points {kind} to fit them instead)"] = count
    frame = frame[~averaged]
    is_final = frame["point_kind"].isin(["final", "cooldown"])
    if which == "final":
        if (~is_final).any():
            dropped["intermediate checkpoints (use --points all to include)"] = int((~is_final).sum())
        frame = frame[is_final]
    else:
        planned = pd.to_numeric(frame.get("planned_steps"), errors="coerce")
        early = ~is_final & (frame["step"] < skip_fraction * planned)
        if early.any():
            dropped[f"intermediate checkpoints in the first {skip_fraction:.0%} of their run"] = int(early.sum())
        frame = frame[~early]
        inter = frame[~frame["point_kind"].isin(["final", "cooldown"])]
        if len(inter) and (len(inter) < len(frame)):
            phases = inter["phase"].fillna("unknown").value_counts().to_dict() if "phase" in inter else {}
            decaying = int((inter["phase"] == "decay").sum()) if "phase" in inter else 0
            warnings.append(
                f"fit mixes {len(frame) - len(inter)} final/cooldown points with {len(inter)} intermediate "
                f"checkpoints (phases: {phases}); intermediate points in their schedule's decay phase "
                f"({decaying} here) are not final losses of shorter runs and bias the data exponent."
            )
    return Points(frame.reset_index(drop=True), dropped, warnings, points.run_column)


def _select_averaged(points: Points, which: str, skip_fraction: float) -> Points:
    """The `ema` or `average` points alone: each is the loss of averaged weights at the compute
    of its step, an alternative to the cooldown point at that compute. EMA points in the first
    `skip_fraction` of their run are dropped (the average still remembers the initialisation)."""
    frame, dropped = points.frame, dict(points.dropped)
    chosen = frame["point_kind"] == which
    if (~chosen).any():
        dropped[f"points other than {which} (--points {which})"] = int((~chosen).sum())
    frame = frame[chosen]
    if which == "ema":
        planned = pd.to_numeric(frame.get("planned_steps"), errors="coerce")
        early = frame["step"] < skip_fraction * planned
        if early.any():
            dropped[f"EMA points in the first {skip_fraction:.0%} of their run"] = int(early.sum())
        frame = frame[~early]
    if frame.empty:
        made_by = "train.ema_decay" if which == "ema" else "`testbed average RUN_DIR --last K`"
        raise TestbedError(f"--points {which}: the table has no {which} points; they come from {made_by}")
    return Points(frame.reset_index(drop=True), dropped, points.warnings, points.run_column)


def _select_outside(points: Points, which: str, skip_fraction: float) -> Points:
    """An outside table (no point_kind): `final` keeps the last point of each run, `all` drops
    the points in the first `skip_fraction` of each run. Rows are their own runs without a run
    column, and then nothing is dropped."""
    frame, dropped = points.frame, dict(points.dropped)
    if frame.empty or "run_fraction" not in frame.columns or frame["run_id"].is_unique:
        return points
    fraction = frame["run_fraction"]
    if which == "final":
        last = fraction >= fraction.groupby(frame["run_id"]).transform("max")
        last &= ~frame.duplicated(["run_id", "run_fraction"], keep="last")
        if (~last).any():
            dropped["earlier checkpoints of each run (use --points all to include)"] = int((~last).sum())
        frame = frame[last]
    else:
        early = fraction < skip_fraction
        if early.any():
            dropped[f"checkpoints in the first {skip_fraction:.0%} of their run (--skip-fraction)"] = int(early.sum())
        frame = frame[~early]
    return Points(frame.reset_index(drop=True), dropped, points.warnings, points.run_column)


def load_points(
    source: str | Path | pd.DataFrame,
    needed: tuple[str, ...],
    positive: tuple[str, ...],
    columns: str | dict | None = None,
    which: str = "final",
    skip_fraction: float = 0.1,
) -> Points:
    frame = source if isinstance(source, pd.DataFrame) else read_source(source)
    mapping = parse_columns(columns) if isinstance(columns, (str, type(None))) else dict(columns)
    frame = apply_columns(frame, mapping)
    run_column = frame.attrs.get("run_column")
    points = clean(frame, needed, positive)
    points = Points(add_run_fraction(points.frame), points.dropped, points.warnings, run_column)
    chosen = select_points(points, which, skip_fraction)
    chosen.rows = {"table": int(len(frame)), "points": which, "skip_fraction": skip_fraction,
                   "kept": points_kept(points, which, len(chosen.frame), skip_fraction)}
    return chosen


def points_kept(points: Points, which: str, kept: int, skip_fraction: float) -> dict[str, int]:
    """The rows each --points choice keeps of the clean rows (`which` keeps `kept`); the
    averaged kinds only where the table has such points."""
    counts = {which: kept}
    kinds = set(points.frame["point_kind"]) if "point_kind" in points.frame.columns else set()
    for other in POINT_CHOICES:
        if other == which or (other in AVERAGED_KINDS and other not in kinds):
            continue
        try:
            counts[other] = len(select_points(points, other, skip_fraction).frame)
        except TestbedError:
            continue
    return counts


def points_line(rows: dict, fitted: int, held_out: int, run_column: str | None, has_kinds: bool) -> str:
    """One line: how many of the table's rows the fit used, and what the other --points choices keep."""
    which, kept = rows["points"], rows["kept"]
    if which == "final":
        means = ("keeps final and cooldown points" if has_kinds else
                 "keeps the last row of each run" if run_column else "keeps every row, each its own run")
    elif which == "all":
        means = (f"keeps checkpoints past the first {rows['skip_fraction']:.0%} of each run" if rows["skip_fraction"]
                 else "keeps every checkpoint")
    else:
        means = f"keeps the {which} points"
    others = "; ".join(f"--points {k} keeps {v:,}" for k, v in kept.items() if k != which)
    held = f" ({held_out:,} more held out)" if held_out else ""
    return (f"fitted {fitted:,} of {rows['table']:,} rows{held}: --points {which} {means} ({kept[which]:,} rows)"
            + (f"; {others}" if others else ""))
