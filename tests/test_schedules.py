"""Each schedule against its formula, computed independently here at hand-picked steps."""

from __future__ import annotations

import math

import pytest

from testbed.errors import ConfigError
from testbed.schedules import (
    decay_shape,
    lr_at,
    lr_multiplier,
    make_schedule,
    phase_at,
    plot_schedule,
    schedule_table,
    spec_from_dict,
    validate,
)

PEAK = 1e-3
T = 100


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-15)


# --- warmup -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["constant", "cosine", "linear", "inverse_sqrt", "wsd"])
def test_warmup_is_linear_and_never_zero(name):
    spec = make_schedule(name=name, warmup_steps=10)
    assert lr_at(0, T, PEAK, spec) == approx(PEAK * 1 / 10)
    assert lr_at(4, T, PEAK, spec) == approx(PEAK * 5 / 10)
    assert lr_at(9, T, PEAK, spec) == approx(PEAK)
    assert [phase_at(s, T, spec) for s in range(10)] == ["warmup"] * 10
    assert phase_at(10, T, spec) != "warmup"


def test_no_warmup_starts_at_peak():
    assert lr_at(0, T, PEAK, make_schedule(name="cosine")) == approx(PEAK)


# --- constant, cosine, linear -----------------------------------------------------------------


def test_constant():
    spec = make_schedule(name="constant", warmup_steps=5)
    assert schedule_table(T, PEAK, spec)[5:] == [PEAK] * (T - 5)
    assert {phase_at(s, T, spec) for s in range(5, T)} == {"stable"}


def test_cosine_values():
    spec = make_schedule(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    floor = 0.1 * PEAK
    # p = (step - 10) / 90
    assert lr_at(10, T, PEAK, spec) == approx(PEAK)
    assert lr_at(55, T, PEAK, spec) == approx(floor + (PEAK - floor) * 0.5)  # p = 0.5
    p = 89 / 90
    assert lr_at(99, T, PEAK, spec) == approx(floor + (PEAK - floor) * 0.5 * (1 + math.cos(math.pi * p)))
    assert lr_at(T, T, PEAK, spec) == approx(floor)
    assert lr_at(T + 50, T, PEAK, spec) == approx(floor)


def test_cosine_and_linear_are_monotone_after_warmup_and_label_decay():
    for name in ("cosine", "linear"):
        spec = make_schedule(name=name, warmup_steps=10)
        table = schedule_table(T, PEAK, spec)
        after = table[10:]
        assert all(a > b for a, b in zip(after, after[1:])), name
        assert {phase_at(s, T, spec) for s in range(10, T)} == {"decay"}


def test_linear_values():
    spec = make_schedule(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, T, PEAK, spec) == approx(PEAK)
    assert lr_at(25, T, PEAK, spec) == approx(0.75 * PEAK)
    assert lr_at(99, T, PEAK, spec) == approx(0.01 * PEAK)
    spec = make_schedule(name="linear", min_lr_ratio=0.2)
    assert lr_at(50, T, PEAK, spec) == approx(0.2 * PEAK + 0.8 * PEAK * 0.5)


# --- inverse square root ----------------------------------------------------------------------


def test_inverse_sqrt_default_timescale_is_warmup():
    spec = make_schedule(name="inverse_sqrt", warmup_steps=16)
    assert lr_at(16, 1000, PEAK, spec) == approx(PEAK)
    assert lr_at(64, 1000, PEAK, spec) == approx(PEAK * math.sqrt(16 / 64))
    assert lr_at(400, 1000, PEAK, spec) == approx(PEAK * 0.2)
    assert phase_at(500, 1000, spec) == "stable"


def test_inverse_sqrt_explicit_timescale_and_no_warmup():
    spec = make_schedule(name="inverse_sqrt", inv_sqrt_timescale=4)
    assert lr_at(0, 100, PEAK, spec) == approx(PEAK)
    assert lr_at(3, 100, PEAK, spec) == approx(PEAK)
    assert lr_at(36, 100, PEAK, spec) == approx(PEAK / 3)
    # default with no warmup: t0 = 1
    assert lr_at(25, 100, PEAK, make_schedule(name="inverse_sqrt")) == approx(PEAK / 5)


# --- WSD --------------------------------------------------------------------------------------


def test_decay_shapes():
    assert decay_shape(0.0, "1-sqrt") == 1.0
    assert decay_shape(0.25, "1-sqrt") == approx(0.5)
    assert decay_shape(0.64, "1-sqrt") == approx(0.2)
    assert decay_shape(1.0, "1-sqrt") == 0.0
    assert decay_shape(0.5, "cosine") == approx(0.5)
    assert decay_shape(0.3, "linear") == approx(0.7)
    assert decay_shape(1.7, "linear") == 0.0  # clipped


def test_wsd_is_constant_before_decay_and_reaches_floor():
    spec = make_schedule(name="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    const = make_schedule(name="constant", warmup_steps=10)
    start = T - round(0.2 * T)  # 80
    for s in range(start):
        assert lr_at(s, T, PEAK, spec) == lr_at(s, T, PEAK, const)
    assert lr_at(start, T, PEAK, spec) == approx(PEAK)
    # Hägele et al.: 1-sqrt with a zero floor is peak * (1 - sqrt(p)), p = (step - 80) / 20
    assert lr_at(85, T, PEAK, spec) == approx(PEAK * (1 - math.sqrt(0.25)))
    assert lr_at(99, T, PEAK, spec) == approx(PEAK * (1 - math.sqrt(19 / 20)))
    assert lr_at(T, T, PEAK, spec) == approx(0.0)
    decay = schedule_table(T, PEAK, spec)[start:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert [phase_at(s, T, spec) for s in (9, 10, 79, 80, 99)] == ["warmup", "stable", "stable", "decay", "decay"]


def test_wsd_floor_and_other_shapes():
    for shape, expected in (("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))):
        spec = make_schedule(name="wsd", decay_fraction=0.5, decay_shape=shape, min_lr_ratio=0.1)
        floor = 0.1 * PEAK
        # decay from step 50 over 50 steps; step 75 is p = 0.5
        assert lr_at(75, T, PEAK, spec) == approx(floor + (PEAK - floor) * expected), shape
        assert lr_at(T, T, PEAK, spec) == approx(floor), shape


def test_wsd_decay_start_step_for_cooldown_branches():
    main = make_schedule(name="wsd", decay_fraction=0.0)
    branch = make_schedule(name="wsd", decay_start_step=40, decay_shape="linear", min_lr_ratio=0.0)
    # a branch leaving the main run at step 40 and cooling down until step 60
    total = 60
    for s in range(40):
        assert lr_at(s, total, PEAK, branch) == lr_at(s, 1000, PEAK, main) == PEAK
    assert lr_at(50, total, PEAK, branch) == approx(0.5 * PEAK)
    assert phase_at(39, total, branch) == "stable"
    assert phase_at(40, total, branch) == "decay"
    assert {phase_at(s, 1000, main) for s in range(1000)} == {"stable"}


def test_decay_start_step_rounding_matches_fraction():
    spec = make_schedule(name="wsd", decay_fraction=0.1)
    assert phase_at(89, 100, spec) == "stable"
    assert phase_at(90, 100, spec) == "decay"


# --- power ------------------------------------------------------------------------------------


def power_formula(step, batch, a=4.0, b=-0.51, peak=PEAK):
    return min(peak, batch * a * ((step + 1) * batch) ** b)


def test_power_matches_formula_and_is_capped():
    batch = 2
    spec = make_schedule(name="power", power_a=4.0, power_b=-0.51)
    peak = 0.5
    table = schedule_table(2000, peak, spec, batch_tokens=batch)
    for s in (0, 10, 123, 999, 1999):
        assert table[s] == approx(power_formula(s, batch, peak=peak))
    assert max(table) <= peak
    assert table[0] == peak  # 2 * 4 * 2^-0.51 is above the cap
    assert table[-1] < peak
    assert all(a >= b for a, b in zip(table, table[1:]))
    assert phase_at(1999, 2000, spec) == "stable"


def test_power_warmup_ramps_to_the_power_value():
    batch = 2
    spec = make_schedule(name="power", warmup_steps=100)
    target = power_formula(100, batch, peak=1.0)
    assert target < 1.0  # so the ramp really targets the power law, not the peak
    assert lr_at(0, 1000, 1.0, spec, batch_tokens=batch) == approx(target / 100)
    assert lr_at(99, 1000, 1.0, spec, batch_tokens=batch) == approx(target)
    assert lr_at(100, 1000, 1.0, spec, batch_tokens=batch) == approx(target)


def test_power_final_decay():
    batch = 2
    spec = make_schedule(name="power", power_decay_fraction=0.1, decay_shape="linear", min_lr_ratio=0.0)
    total = 1000
    at_start = power_formula(900, batch, peak=1.0)
    assert lr_at(899, total, 1.0, spec, batch_tokens=batch) == approx(power_formula(899, batch, peak=1.0))
    assert lr_at(900, total, 1.0, spec, batch_tokens=batch) == approx(at_start)
    assert lr_at(950, total, 1.0, spec, batch_tokens=batch) == approx(0.5 * at_start)
    assert lr_at(total, total, 1.0, spec, batch_tokens=batch) == approx(0.0)
    assert phase_at(899, total, spec) == "stable"
    assert phase_at(900, total, spec) == "decay"


def test_power_floor_never_raises_the_decay():
    # a floor above the power-law value at the decay start would make the "decay" climb
    batch = 2
    spec = make_schedule(name="power", power_decay_fraction=0.5, min_lr_ratio=0.9)
    table = schedule_table(1000, 1.0, spec, batch_tokens=batch)
    assert all(a >= b for a, b in zip(table[500:], table[501:]))


def test_power_batch_size_is_beta_and_tokens_stay_tokens():
    batch_tokens, seqs = 4096 * 64, 64
    spec = make_schedule(name="power", power_batch_size=seqs)
    peak = 0.02  # the paper's lr_max
    for step in (10, 1000, 100_000):
        expected = min(peak, seqs * 4.0 * ((step + 1) * batch_tokens) ** -0.51)
        assert lr_at(step, 200_000, peak, spec, batch_tokens=batch_tokens) == approx(expected)
    # counted in sequences the law decays within a realistic run; counted in tokens it would not
    assert lr_at(100_000, 200_000, peak, spec, batch_tokens=batch_tokens) < peak / 10
    tokens_beta = make_schedule(name="power")
    assert lr_at(100_000, 200_000, peak, tokens_beta, batch_tokens=batch_tokens) == peak
    with pytest.raises(ConfigError, match=r"schedule\.power_batch_size is 0"):
        lr_at(0, 100, PEAK, make_schedule(name="power", power_batch_size=0), batch_tokens=64)


def test_the_trainer_passes_the_batch_in_sequences():
    from testbed.config import load_config
    from testbed.plan import run_schedule

    config = load_config(None, ["schedule.name=power", "data.seq_len=128", "train.global_batch_tokens=8192"])
    assert run_schedule(config, 100).power_batch_size == 64
    config = load_config(None, ["schedule.name=power", "schedule.power_batch_size=3"])
    assert run_schedule(config, 100).power_batch_size == 3


def test_power_needs_batch_tokens():
    with pytest.raises(ConfigError, match="batch_tokens"):
        lr_at(0, 100, PEAK, make_schedule(name="power"))


# --- helpers ----------------------------------------------------------------------------------


def test_lr_multiplier_and_table_length():
    spec = make_schedule(name="cosine", warmup_steps=10)
    assert lr_multiplier(55, T, spec) == approx(lr_at(55, T, 3.0, spec) / 3.0)
    assert len(schedule_table(T, PEAK, spec)) == T


def test_spec_from_dict():
    assert spec_from_dict({"name": "wsd", "warmup_steps": 5}) == make_schedule(name="wsd", warmup_steps=5)
    assert spec_from_dict(None) == make_schedule()
    with pytest.raises(ConfigError, match=r"schedule\.warmup.*warmup_steps"):
        spec_from_dict({"warmup": 5})


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, pattern",
    [
        (dict(name="cosin"), r"schedule\.name is 'cosin'.*did you mean 'cosine'"),
        (dict(name="wsd", decay_shape="sqrt"), r"schedule\.decay_shape is 'sqrt'.*1-sqrt"),
        (dict(warmup_steps=100), r"schedule\.warmup_steps is 100.*100 steps"),
        (dict(warmup_steps=-1), r"schedule\.warmup_steps is -1"),
        (dict(min_lr_ratio=1.5), r"schedule\.min_lr_ratio is 1\.5.*between 0 and 1"),
        (dict(name="wsd", decay_fraction=-0.1), r"schedule\.decay_fraction is -0\.1"),
        (dict(name="power", power_decay_fraction=2.0), r"schedule\.power_decay_fraction is 2\.0"),
        (dict(name="inverse_sqrt", inv_sqrt_timescale=0), r"schedule\.inv_sqrt_timescale is 0"),
        (dict(name="power", power_b=0.5), r"schedule\.power_b is 0\.5"),
        (dict(name="power", power_a=0.0), r"schedule\.power_a is 0\.0"),
        (dict(name="cosine", decay_start_step=50), r"schedule\.decay_start_step is 50.*wsd or power"),
        (dict(name="wsd", warmup_steps=10, decay_start_step=5), r"schedule\.decay_start_step is 5"),
        (dict(name="wsd", decay_start_step=101), r"schedule\.decay_start_step is 101"),
        (dict(name="wsd", warmup_steps=50, decay_fraction=0.6), r"schedule\.decay_fraction is 0\.6.*step 40"),
    ],
)
def test_validation_names_field_and_value(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(make_schedule(**spec), T)


def test_validation_accepts_defaults_and_bad_total_steps():
    validate(make_schedule(), T)  # must not raise
    with pytest.raises(ConfigError, match="total_steps is 0"):
        validate(make_schedule(), 0)
    with pytest.raises(ConfigError, match="peak learning rate is -1"):
        lr_at(0, T, -1, make_schedule())


# --- plot -------------------------------------------------------------------------------------


def test_plot_schedule_writes_png(tmp_path):
    out = tmp_path / "schedule.png"
    plot_schedule(str(out), 200, PEAK, make_schedule(name="wsd", warmup_steps=20), title="wsd")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


# --- phases: every schedule declares them -------------------------------------------------------


HERE = __import__("pathlib").Path(__file__).resolve().parent
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "train.global_batch_tokens=256", "train.log_every=1", "train.eval_every=2", "logging.wandb=false",
        "logging.progress=false", "data.val_sequences=8", "checkpoint.every=2", "train.steps=6"]


@pytest.fixture()
def own_registry(monkeypatch):
    """Schedules registered in a test are gone after it (tests/user_schedule.py registers again)."""
    import sys

    from testbed.schedules import SCHEDULES

    monkeypatch.setattr(SCHEDULES, "_items", dict(SCHEDULES._items))
    had = sys.modules.pop("user_schedule", None)
    monkeypatch.syspath_prepend(str(HERE))
    yield SCHEDULES
    # The module imported here registered into the copy: forget it, so a later import registers
    # its schedules again in the real registry.
    sys.modules.pop("user_schedule", None)
    if had is not None:
        sys.modules["user_schedule"] = had


def test_a_user_schedule_without_phases_is_refused_with_one_line(own_registry, tmp_path, monkeypatch):
    from dataclasses import dataclass

    from testbed.config import load_config
    from testbed.schedules import Constant, Schedule

    @dataclass(frozen=True)
    class Decaying(Schedule):
        def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
            return peak_lr * (1 - step / total_steps)

    with pytest.raises(ConfigError) as err:
        own_registry.register("test_undeclared")(Decaying)
    message = str(err.value)
    assert "\n" not in message and "schedule 'test_undeclared'" in message and "Decaying" in message
    assert "does not declare its phases" in message and "decays = True" in message and "decay_start" in message
    assert "test_undeclared" not in own_registry

    @dataclass(frozen=True)
    class FromConstant(Constant):  # a new curve inherits no phases: Constant's are for its own
        def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
            return peak_lr * (1 - step / total_steps)

    with pytest.raises(ConfigError, match=r"'test_from_constant'.*it inherits Constant's phases but "
                                          r".*FromConstant defines a learning rate of its own"):
        own_registry.register("test_from_constant")(FromConstant)

    # at config time: the module named in imports: is refused as it registers
    (tmp_path / "undeclared_schedule.py").write_text(
        "from dataclasses import dataclass\nfrom testbed.schedules import SCHEDULES, Schedule\n\n"
        "@SCHEDULES.register('test_undeclared_module')\n@dataclass(frozen=True)\nclass Undeclared(Schedule):\n"
        "    def after_warmup(self, step, total_steps, peak_lr, batch_tokens):\n        return peak_lr\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^schedule 'test_undeclared_module' \(undeclared_schedule.Undeclared\) "
                                          r"does not declare its phases; set `decays = True`[^\n]*$"):
        load_config(None, ["imports=[undeclared_schedule]", "schedule.name=test_undeclared_module"])


def test_a_decaying_user_schedules_checkpoints_are_recorded_as_decay(own_registry, tmp_path):
    import json

    from testbed.config import load_config
    from testbed.train.trainer import train

    for name, phase in (("test_exp_decay", "decay"), ("test_halving", "stable")):
        config = load_config(None, TINY + ["imports=[user_schedule]", f"schedule.name={name}"])
        assert phase_at(3, 6, config.schedule) == phase
        train(config, tmp_path / name)
        index = [json.loads(line) for line in (tmp_path / name / "checkpoints" / "index.jsonl").read_text().splitlines()]
        assert index and {line["phase"] for line in index} == {phase}


def test_fit_tables_clean_points_follow_the_schedules_phases(own_registry, tmp_path):
    """--points all reports the intermediate points in a decay phase as the schedule declares it
    (recorded, or asked of the run's saved schedule), whatever the schedule's name says."""
    import user_schedule  # noqa: F401  (registers test_exp_decay)

    from testbed.fit.points.collect import collect_runs
    from testbed.fit.points.table import Points, select_points
    from testbed.rundir import RunDir

    sections = {"inverse_sqrt": {"name": "inverse_sqrt", "warmup_steps": 0},  # stable: "inv" in its name
                "test_exp_decay": {"name": "test_exp_decay", "warmup_steps": 0},  # decays: no telling name
                "wsd": {"name": "wsd", "warmup_steps": 0, "decay_fraction": 0.5}}  # stable, then decay
    for name, section in sections.items():
        rd = RunDir(tmp_path / "sweep" / "runs" / name)
        rd.write_run({"run_id": name, "schedule": name, "planned_steps": 10, "n_params": 1000,
                      "global_batch_tokens": 100, "flops_per_token": 6000, "config": {"schedule": section}})
        for step in (4, 8, 10):  # older index lines: no phase recorded
            rd.append_index({"step": step, "kind": "final" if step == 10 else "science", "path": f"step{step}",
                             "val_loss": 3.0 - step / 10})
    table = collect_runs(tmp_path / "sweep")
    phases = {(r.run_id, r.step): r.phase for r in table.itertuples()}
    assert phases[("inverse_sqrt", 4)] == phases[("inverse_sqrt", 8)] == "stable"
    assert phases[("test_exp_decay", 4)] == phases[("test_exp_decay", 8)] == "decay"
    assert (phases[("wsd", 4)], phases[("wsd", 8)]) == ("stable", "decay")
    chosen = select_points(Points(table.assign(N=1000.0)), "all", 0.0)
    assert len(chosen.frame) == 9
    (warning,) = chosen.warnings
    assert "intermediate points in their schedule's decay phase (3 here)" in warning


def test_branches_ask_the_parents_schedule_not_its_name(own_registry):
    """A branch continues any schedule whose stable phase holds the peak LR at the branch point,
    named wsd or not, and refuses one whose stable LR has left the peak (it would jump back up)."""
    from testbed.config import load_config
    from testbed.errors import TestbedError
    from testbed.train.branch import branch_config

    def parent(*overrides):
        return load_config(None, TINY + ["imports=[user_schedule]", "schedule.warmup_steps=1", *overrides])

    # A user schedule (stable after warmup, halving every 100 steps): at the peak until step 100.
    halving = parent("schedule.name=test_halving", "schedule.halve_every=100")
    branched = branch_config(halving, 4, 0.5, "linear")
    assert branched.schedule.name == "wsd" and branched.train.steps == 8
    with pytest.raises(TestbedError, match=r"learning rate there is [\d.e-]+, not its peak optim.lr"):
        branch_config(parent("schedule.name=test_halving", "schedule.halve_every=2"), 4, 0.5, "linear")
    # A decaying user schedule has no stable phase at all.
    with pytest.raises(TestbedError, match=r"schedule \('test_exp_decay'\) has no stable phase"):
        branch_config(parent("schedule.name=test_exp_decay"), 4, 0.5, "linear")
