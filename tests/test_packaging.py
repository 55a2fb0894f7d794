"""The built wheel runs on its own: ladder presets and SLURM templates ship inside the package.

A wheel is built from a copy of the sources, installed into a fresh virtualenv outside the
checkout (dependencies reach it through a path file naming this interpreter's site-packages),
and exercised from another directory with no PYTHONPATH, so a file that only the checkout holds
cannot be found.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, bin folder, clean env, work dir) of a fresh venv holding only the built wheel."""
    root = tmp_path_factory.mktemp("pkg")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME",
                                                            "VIRTUAL_ENV", "TESTBED_CONFIGS")}
    # Build from a copy holding only what the sdist would, so the checkout gets no build/ or
    # egg-info and the wheel cannot pick up stray files.
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "testbed", src / "testbed",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = root / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(wheels), str(src)], cwd=root, env=env, timeout=180)
    (wheel,) = wheels.glob("testbed-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, env=env)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=root, env=env).strip())
    # A plain path line: the parent's own .pth files (the editable install's finder among them)
    # are not executed for a folder added this way, so the checkout stays invisible.
    (site / "parent-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --force-reinstall: pip also sees the parent's editable testbed through that path; it
    # leaves it alone (outside this environment) and installs the wheel here.
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
         "-q", str(wheel)], cwd=root, env=env, timeout=180)
    work = root / "work"
    work.mkdir()
    return python, bindir, env, work


def test_installed_package_lives_in_the_venv(installed):
    python, _, env, work = installed
    out = run([str(python), "-c", "import testbed, testbed.config as c; "
               "print(testbed.__file__); print(c.preset_names())"], cwd=work, env=env)
    where, presets = out.splitlines()
    assert Path(where).resolve().is_relative_to(python.parent.parent.resolve())
    assert not Path(where).resolve().is_relative_to(REPO)
    assert "1m" in presets and "100k" in presets


def test_installed_wheel_trains_a_preset(installed):
    python, bindir, env, work = installed
    (work / "tiny.yaml").write_text("name: pkg-smoke\n")
    run([str(bindir / "testbed"), "train", "tiny.yaml", "--run-dir", "run", "model.preset=1m",
         "model.max_seq_len=64", "data.seq_len=32", "train.global_batch_tokens=256",
         "train.steps=3", "train.eval_every=3", "data.val_sequences=4", "logging.wandb=false",
         "logging.progress=false", "checkpoint.final=false"], cwd=work, env=env, timeout=180)
    record = json.loads((work / "run" / "run.json").read_text())
    assert record["planned_steps"] == 3
    assert record["config"]["model"]["d_model"] == 128  # the 1m rung's width, from the wheel
    assert record["config"]["model"]["n_layers"] == 5
    assert json.loads((work / "run" / "status.json").read_text())["state"] == "done"


def test_installed_wheel_renders_slurm_scripts(installed):
    python, _, env, work = installed
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from testbed.sweep import slurm
        profile = slurm.load_profile(sys.argv[1])
        print(slurm.render_script("pkg", Path("sweep"), [["a", "b"], ["c"]], profile))
        print("=====")
        print(slurm.render_script("pkg", Path("sweep"), [["a"]], {**profile, "nodes": 2}))
    """)
    (work / "profile.yaml").write_text("partition: debug\ntime: '00:10:00'\ncpus_per_task: 1\n"
                                       "mem: 500M\nmax_concurrent: 2\n")
    array, multinode = run([str(python), "-c", code, "profile.yaml"], cwd=work, env=env).split("=====")
    assert array.startswith("#!/bin/bash")
    for line in ("#SBATCH --job-name=pkg", "#SBATCH --array=0-1%2", "#SBATCH --partition=debug",
                 "#SBATCH --time=00:10:00", "#SBATCH --mem=500M", "0) RUNS=(a b) ;;", "1) RUNS=(c) ;;"):
        assert line in array
    assert "torch.distributed.run" in multinode and "{{" not in array + multinode
