"""The gpu-min size in CI's CPU smoke mode: every gpu-min study plans within 8 minutes and 1e16-3e16
FLOPs before its corpus exists, the installed-sources corpus is made from a small folder without
`datasets` (duplicates dropped, split by file, the manifest's record), and `study run` records the
plan's estimate beside its wall time."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

GPU_MIN_STUDIES = ["shape", "annealing", "ablation", "wsd"]


def test_cli_sizes_are_the_studies_sizes():
    from testbed.study import base, cli

    assert cli.SIZES == base.SIZES and "gpu-min" in base.SIZES


def test_gpu_min_plans_fit_eight_minutes_without_the_corpus(tmp_path, monkeypatch):
    from testbed.study import corpus, recipes
    from testbed.study.base import STUDIES
    from testbed.study.runner import load, plan

    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    load()
    assert sorted(n for n, s in STUDIES.items() if "gpu-min" in s.sizes) == sorted(GPU_MIN_STUDIES)
    for name in GPU_MIN_STUDIES:
        p = plan(name, "gpu-min")
        assert p["problems"] == [], (name, p["problems"])
        assert p["startup_s"] > 0 and p["seconds"] <= recipes.BUDGET_S["gpu-min"] == 480, name
        assert 1e16 <= p["flops"] <= 3e16, (name, p["flops"])
        assert p["unprepared"] == [str(corpus.installed_path())], name
        bound = corpus.train_tokens(corpus.installed_path())
        assert bound == (int(corpus.INSTALLED_BYTES_BOUND * 0.99 / corpus.BYTES_PER_TOKEN_BOUND), False)
        assert all(r["corpus_tokens"] == bound[0] for r in p["sweeps"]), name
    assert not (tmp_path / "studies").exists()  # planning prepares nothing
    # a study without a gpu-min branch says so instead of failing inside its sweeps
    from testbed.errors import TestbedError

    with pytest.raises(TestbedError, match="not defined for study 'chinchilla'"):
        plan("chinchilla", "gpu-min")


def test_cpu_plan_on_a_fresh_clone_names_the_corpus_to_prepare(tmp_path, monkeypatch):
    """Before the cpu corpus is prepared, `study plan` takes the vocabulary from the folder's name
    and notes the folder it prepares first, instead of failing on its missing manifest."""
    from testbed.study import corpus
    from testbed.study.runner import load, plan

    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    load()
    from testbed.study import recipes
    from testbed.study.builtin import repetition

    p = plan("repetition", "cpu")  # on the 512-token rung of the BPE ladder, its vocabulary stated
    assert p["problems"] == [] and p["unprepared"] == [recipes.ladder_corpus("cpu", recipes.SMALL_VOCAB)]
    assert p["startup_s"] == 0 and 0 < p["seconds"] <= 1800
    # the vocabulary not stated (as a config of one's own may leave it): taken from the folder's name
    monkeypatch.setattr(repetition, "small_vocab_base", recipes.base)
    assert plan("repetition", "cpu")["unprepared"] == [str(corpus.stdlib_path())]


def _tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__pycache__").mkdir()
    for i in range(12):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(30))
        (root / "pkg" / f"mod{i}.py").write_text(f'"""Module {i}."""\n\n{body}')
    shutil.copy(root / "pkg" / "mod0.py", root / "pkg" / "sub" / "copy_of_mod0.py")  # a duplicate
    (root / "pkg" / "__pycache__" / "mod1.py").write_text("skipped = True\n")
    (root / "pkg" / "empty.py").write_text("\n\n")
    (root / "pkg" / "notes.txt").write_text("not python\n")


def test_installed_corpus_from_a_small_folder(tmp_path, monkeypatch):
    from testbed.data.shards import read_manifest
    from testbed.data.sources import document_hash
    from testbed.study import corpus

    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on the GPU machine: no `datasets`
    root = tmp_path / "site-packages"
    _tree(root)
    names = [name for name, _ in corpus.installed_files([root])]
    assert names == sorted(names) and len(names) == 14  # 12 modules, the copy, empty.py
    assert all(n.startswith("site-packages/pkg/") and "__pycache__" not in n for n in names)

    record = corpus.write_installed_jsonl(tmp_path / "small.jsonl", [root], max_file_bytes=1000)
    assert record["files"] == 0 and record["oversized_dropped"] == 13  # every module (and the copy) is over 1 kB

    out = corpus.installed_corpus(vocab_size=300, roots=[root], out=tmp_path / "cache" / "pysrc-test",
                                  workers=1, sample_bytes=1_000_000, log=lambda message: None)
    manifest = read_manifest(out)  # the added corpus block is sealed by the checksum
    made = manifest["corpus"]
    assert made["files"] == 12 == manifest["documents"]
    assert made["duplicates_dropped"] == 1 and made["empty_dropped"] == 1
    texts = [(root / "pkg" / f"mod{i}.py").read_text() for i in range(12)]
    assert made["bytes"] == sum(len(t.encode()) for t in texts) == manifest["bytes"]
    assert len(made["content_sha256"]) == 64 and made["build_s"] >= 0 and made["python"]
    # split by file, by a hash of its content: the validation documents are those below the threshold
    threshold = manifest["split"]["threshold"]
    val = [t for t in texts if document_hash(t.encode()) < threshold]
    assert manifest["splits"]["validation"]["documents"] == len(val) >= 1
    assert manifest["splits"]["train"]["documents"] == 12 - len(val)
    assert manifest["source"]["kind"] == "files" and not (out.parent / f"{out.name}.jsonl").exists()
    # the content hash names the content, not where it lies or what the files are called
    moved = tmp_path / "elsewhere" / "dist-packages"
    shutil.copytree(root, moved)
    (moved / "pkg" / "mod3.py").rename(moved / "pkg" / "renamed.py")
    again = corpus.write_installed_jsonl(tmp_path / "again.jsonl", [moved])
    assert again["content_sha256"] == made["content_sha256"]
    # a prepared folder is kept as it is
    assert corpus.installed_corpus(vocab_size=300, roots=[root], out=out, log=lambda m: None) == out
    assert corpus.parse(corpus.installed_path(300)) == {"corpus": "installed", "vocab_size": 300}


def test_plain_reader_gives_the_documents_datasets_gives(tmp_path):
    pytest.importorskip("datasets")
    from testbed.data.sources import open_source

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}\nline é"}) + "\n" for i in range(5))
                                      + "\n" + json.dumps({"text": ""}) + "\n")
    (tmp_path / "b.txt").write_text("para one\nstill one\n\n\npara two\n\n\n\nthree\n")
    for spec in (tmp_path / "a.jsonl", tmp_path / "b.txt", tmp_path):
        plain = open_source(spec, reader="plain")
        via = open_source(spec, reader="datasets")
        assert list(plain.iter_texts()) == list(via.iter_texts()), spec
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n[1, 2]\n')
    from testbed.errors import TestbedError

    with pytest.raises(TestbedError, match="bad.jsonl:2 holds a JSON list"):
        list(open_source(bad, reader="plain").iter_texts())


def test_study_run_records_the_plan_estimate(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    import user_study  # noqa: F401  (registers user-demo)

    from testbed.study import runner

    out = tmp_path / "mine"
    figures = runner.run("user-demo", "tiny", out, log=lambda message: None)
    call = figures["invocations"][-1]
    assert call["estimate_runs"] == 2 and call["estimate_s"] > 0 and call["wall_s"] > 0
    assert f"`study plan` estimated {call['estimate_s']:.0f} s for all 2 runs" in (out / "report.md").read_text()
