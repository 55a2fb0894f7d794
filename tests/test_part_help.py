"""Registered parts show their settings (docs/ablations.md): `testbed parts` lists every registry
with each name, its settings, their defaults and the config keys that set them; `testbed train
--dry-run` lists the chosen parts' settings resolved; `testbed train --help` points to both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed.cli import main
from testbed.config import PART_OPTIONS

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SMOKE = REPO / "configs" / "smoke.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="disabled")


@pytest.fixture()
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_parts_lists_the_built_ins_and_a_user_part_with_its_defaults(capsys, on_path):
    assert main(["parts", "--import", "user_norm"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    heads = [line for line in lines if not line.startswith(" ")]
    for key in ("model.norm", "model.attention", "model.mlp", "model.position", "optim.name", "schedule.name"):
        assert any(head.startswith(key) for head in heads), key
    norms = lines[lines.index(heads[0]) + 1:lines.index(heads[1])]
    assert heads[0].startswith("model.norm, model.qk_norm_type (norm")
    assert [n.split()[0] for n in norms] == ["layernorm", "rmsnorm", "test_dyt"]
    assert norms[-1].split() == ["test_dyt", "model.norm_options.alpha=0.5"]
    assert norms[1].split() == ["rmsnorm"]  # no settings
    # The schedules' fields, in their section, with their defaults.
    assert any(line.split()[:2] == ["wsd", "schedule.min_lr_ratio=0.1"] and "schedule.decay_fraction=0.2" in line
               for line in lines)
    assert "schedule.warmup_steps=0" in next(h for h in heads if h.startswith("schedule.name"))
    assert any(line.split() == ["adamw"] for line in lines) and any(h.startswith("--law") for h in heads)


def test_a_bad_import_is_one_error_line(capsys):
    assert main(["parts", "--import", "no_such_part_module"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "--import 'no_such_part_module' cannot be imported" in captured.err
    assert "Traceback" not in captured.err


def test_dry_run_shows_the_chosen_parts_settings_set_and_default(tmp_path, capsys, on_path):
    base = [str(SMOKE), "--run-dir", str(tmp_path / "run"), "imports=[user_norm]", "model.norm=test_dyt",
            "--dry-run"]
    assert main(["train", *base, "model.norm_options.alpha=0.25", "model.qk_norm=true",
                 "model.qk_norm_type=test_dyt"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["model"]["norm_options"] == {"alpha": 0.25}  # still a config file
    comments = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    assert "model.norm = test_dyt  (model.norm_options: alpha=0.25 [set])" in comments
    assert "model.qk_norm_type = test_dyt  (model.qk_norm_options: alpha=0.5 [default])" in comments
    assert comments[-1].startswith("run dir ") and not (tmp_path / "run").exists()
    # Parts without settings (swiglu, rope, adamw here) are not listed; no QK-norm, no QK line.
    assert main(["train", *base]) == 0
    comments = [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    assert [c for c in comments if c.startswith("model.") or c.startswith("optim.")] == ["model.norm = test_dyt  (model.norm_options: alpha=0.5 [default])"]


def test_train_help_points_to_testbed_parts_without_importing_torch():
    code = ("import sys\nfrom testbed.cli import main\ntry:\n    main(['train', '--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the epilog
    assert "testbed parts" in text and "--dry-run" in text
    for key in PART_OPTIONS:  # every options key named
        assert key in text, key
