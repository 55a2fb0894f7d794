"""Studies: the list, plans, re-analysis without training, a user study (each built-in study's tiny run and
report: test_study_tiny_models.py and test_study_tiny_data.py)."""

from __future__ import annotations

import json
import os

import pytest
from study_tiny import DATA_STUDIES, MODEL_STUDIES, ROOT, STUDIES, cli


def test_list_names_every_study_with_its_claim():
    from testbed.study.base import STUDIES as registry
    from testbed.study.runner import load

    load()
    out = cli("study", "list")
    assert out.returncode == 0, out.stderr
    for name in STUDIES:
        assert name in registry.names()
        line = next(line for line in out.stdout.splitlines() if line.startswith(name + " "))
        assert registry.get(name).claim in line
    # every built-in study is trained at tiny by one of the two files that share them between workers
    builtin = {n for n in registry.names() if registry.get(n).module.startswith("testbed.study.builtin")}
    assert sorted(MODEL_STUDIES + DATA_STUDIES) == sorted(STUDIES) == sorted(builtin)


def test_every_cpu_study_fits_its_budget_and_the_corpus(tmp_path, monkeypatch):
    """`study plan` at cpu: every study's runs fit 30 min at the stated CPU rate, and no run needs
    more distinct tokens than the corpus holds (checked against the corpus's lower estimate, so
    the real, prepared corpus fits too)."""
    from testbed.study import corpus, recipes
    from testbed.study.runner import load, plan

    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    estimate, prepared = corpus.train_tokens()
    assert not prepared and estimate > 5_000_000, estimate  # Python 3.11's library: ~30 MB
    folder = corpus.stdlib_path()
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"vocab_size": corpus.VOCAB_SIZE,
                                                       "splits": {"train": {"tokens": estimate}}}))
    load()
    for name in STUDIES:
        p = plan(name, "cpu")
        assert p["problems"] == [], (name, p["problems"])
        assert 0 < p["seconds"] <= recipes.BUDGET_S["cpu"], name
        assert all(r["largest_fresh_tokens"] <= estimate for r in p["sweeps"]), name
    # the check can fail: at a quarter of the rate the same recipe overruns
    assert plan("wsd", "cpu", rate=recipes.rate("cpu", 64) / 4)["problems"]
    result = cli("study", "plan", "wsd", "--size", "cpu", "--flops-per-s", "1e9")
    assert result.returncode == 1 and "exceeds the cpu budget" in result.stdout, result.stdout
    # what bracketing may add is stated apart from the total
    assert "sweep wsd-wsd extends its LR grid where a cell's optimum lands at an edge: at most" in result.stdout
    assert plan("wsd", "cpu")["sweeps"][0]["bracket_runs_at_most"] > 0


def test_hub_corpus_tokenises_with_the_cores_it_may_use(tmp_path, monkeypatch):
    """On a GPU node inside a SLURM allocation, the hub corpus is tokenised by as many workers
    as the allocation grants (the affinity mask), not one per core of the node."""

    from testbed.study import corpus

    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    calls = []
    monkeypatch.setattr(corpus, "_prepare", lambda out, args, vocab, nested: calls.append(args))
    corpus.hub_corpus(log=lambda message: None)
    assert calls and calls[0][calls[0].index("--workers") + 1] == "12"


def test_every_gpu_study_fits_its_budget_and_the_hub_corpus(tmp_path, monkeypatch):
    """`study plan` at gpu, before the hub corpus is prepared: every study reads FineWeb-Edu's
    sample (never the CPU corpus, which its runs would repeat hundreds of times), fits the GPU
    budget, and no run needs more distinct tokens than the corpus's lower bound."""
    from testbed.study import corpus, recipes
    from testbed.study.runner import load, plan

    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    from testbed.study.base import STUDIES as registry

    load()
    without = [name for name in STUDIES if "gpu" not in registry.get(name).sizes]
    assert without == ["mixture"]  # its domains are the library's: no hub version of them
    for name in (n for n in STUDIES if n not in without):
        p = plan(name, "gpu")
        assert p["problems"] == [], (name, p["problems"])
        assert 0 < p["seconds"] <= recipes.BUDGET_S["gpu"], name
        assert p["unprepared"] and all(corpus.parse(path)["corpus"] == "hub" for path in p["unprepared"])
        assert all(r["corpus_tokens"] == corpus.HUB_TRAIN_TOKENS_BOUND for r in p["sweeps"]), name
    # the corpus check can fail: a run longer than the corpus is named
    from testbed.study.builtin import chinchilla

    monkeypatch.setattr(chinchilla, "budgets", lambda size: [3e18])
    assert any("distinct training tokens" in q for q in plan("chinchilla", "gpu")["problems"])


@pytest.mark.slow
def test_user_study_from_import(tmp_path, monkeypatch):
    listed = cli("study", "list", "--import", "user_study")
    assert "user-demo" in listed.stdout, listed.stderr
    out = tmp_path / "mine"
    result = cli("study", "run", "user-demo", "--out", str(out), "--import", "user_study")
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((out / "figures.json").read_text())
    assert figures["study"] == "user-demo" and figures["measured"]["value"] is not None
    # the folder remembers the study's module: report needs no --import
    assert cli("study", "report", str(out)).returncode == 0
    # --publish writes NAME.md headed by the command, the machine and the wall time
    assert cli("study", "report", str(out), "--publish", str(tmp_path / "docs")).returncode == 0
    published = (tmp_path / "docs" / "user-demo.md").read_text()
    wall = sum(c["wall_s"] for c in figures["invocations"])
    assert "testbed study run user-demo --size tiny" in published and "CPU cores" in published
    assert f"Wall time: {wall / 60:.1f} min" in published and figures["claim"] in published
    assert "interrupted" not in published
    # An invocation killed midway is listed from its start, its time unknown, never hidden: the
    # published wall time sums the finished ones and names the other.
    import user_study  # noqa: F401  (registers user-demo in this process)

    from testbed.study import runner

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_sweep", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run("user-demo", "tiny", out, log=lambda message: None)
    calls = json.loads((out / "study.json").read_text())["invocations"]
    assert len(calls) == 2 and calls[0]["wall_s"] == wall and calls[1]["wall_s"] is None
    assert calls[0]["trained_runs"] == figures["runs"] > 0, calls[0]
    # A run refused before training (bad input) is no interrupted invocation: nothing is added.
    from testbed.errors import TestbedError
    from testbed.study import corpus

    def refused(specs):
        raise TestbedError("data.path: refused")

    monkeypatch.setattr(corpus, "ensure_for", refused)
    with pytest.raises(TestbedError):
        runner.run("user-demo", "tiny", out, log=lambda message: None)
    assert json.loads((out / "study.json").read_text())["invocations"] == calls
    assert cli("study", "report", str(out), "--publish", str(tmp_path / "docs")).returncode == 0
    published = (tmp_path / "docs" / "user-demo.md").read_text()
    assert (f"Wall time: {wall / 60:.1f} min for `study run` (1 finished invocation(s), data preparation "
            "included) and 1 interrupted invocation(s), whose time is not recorded") in published
    assert "the last `study run` was interrupted" in published  # the report body: the latest alone


def test_two_study_runs_on_one_out_keep_both_invocations(tmp_path, monkeypatch):
    """Two `study run` on one --out at once (two shells): both invocations stay in study.json,
    each with its own end. Here A starts, B starts, A finishes, then B finishes; study.json used to
    be read once and written whole, so A's end dropped B and B's end recorded A as interrupted."""
    import threading

    import user_study  # noqa: F401  (registers user-demo in this process)

    from testbed.study import corpus, runner

    out = tmp_path / "out"
    both_started = threading.Barrier(2, timeout=30)
    a_started, a_finished = threading.Event(), threading.Event()
    waited: set[str] = set()
    seen_by_b: list[list[dict]] = []  # study.json once A has finished, B still running

    def sweep(out_, spec, **kwargs):
        name = threading.current_thread().name
        if name not in waited:  # each invocation's first sweep: both have recorded their start
            waited.add(name)
            if name == "A":
                a_started.set()
            both_started.wait()
            if name == "B":
                assert a_finished.wait(30)
                seen_by_b.append(json.loads((out / "study.json").read_text())["invocations"])
        return out_ / "sweep" / spec["name"]

    monkeypatch.setattr(corpus, "ensure_for", lambda specs: None)
    monkeypatch.setattr(runner, "run_sweep", sweep)
    monkeypatch.setattr(runner, "report", lambda out_: {})
    errors = []

    def invoke():
        try:
            runner.run("user-demo", "tiny", out, log=lambda message: None)
        except BaseException as err:  # noqa: BLE001  (reported by the assertion below)
            errors.append(err)
            both_started.abort()
        finally:
            if threading.current_thread().name == "A":
                a_finished.set()

    threads = [threading.Thread(target=invoke, name=name) for name in "AB"]
    threads[0].start()
    assert a_started.wait(30)  # one write at a time: only the read-modify-write interleaves
    threads[1].start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(seen_by_b[0]) == 2, seen_by_b  # A's end kept B's start
    calls = json.loads((out / "study.json").read_text())["invocations"]
    assert len(calls) == 2 and all(c["wall_s"] is not None for c in calls), calls
    assert "interrupted" not in runner.invocations_text(calls)


def test_wall_time_of_a_folder_whose_runs_were_trained_elsewhere_says_so():
    """A re-analysis (an earlier version's runs in a fresh folder) records invocations that
    trained nothing: its header must not read as the study's training time."""
    from testbed.study.runner import invocations_text

    again = [{"wall_s": 0.9, "trained_runs": 0}]
    assert invocations_text(again).endswith("which trained no run: every run was trained before this folder's "
                                            "first `study run`")
    for calls in ([{"wall_s": 60.0, "trained_runs": 12}, *again], [{"wall_s": 0.9}],
                  [*again, {"wall_s": None}]):
        assert "trained no run" not in invocations_text(calls), calls


def test_unknown_study_and_foreign_folder(tmp_path):
    result = cli("study", "run", "wds", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "did you mean 'wsd'" in result.stderr
    result = cli("study", "report", str(tmp_path))
    assert result.returncode == 2 and "study.json" in result.stderr
    # a folder of an earlier version is not re-reported (and mislabelled) under this one
    from testbed.study.base import STUDIES as registry
    from testbed.study.runner import load

    load()
    old = tmp_path / "old"
    old.mkdir()
    (old / "study.json").write_text(json.dumps({"study": "vocab", "version": registry.get("vocab").version - 1,
                                                "size": "tiny"}))
    result = cli("study", "report", str(old))
    assert result.returncode == 2, result.stderr
    assert f"v{registry.get('vocab').version - 1}, but this testbed defines v" in result.stderr
    assert not (old / "report.md").exists()


def test_compute_multiplier_recovers_a_known_shift():
    """A variant whose frontier is the baseline's at k times the compute has multiplier k at every
    budget; a steeper variant starts behind and ends ahead, and the offset's trend says so."""
    from testbed.stats.curves import compute_multiplier

    budgets = [1e12, 3e12, 1e13, 3e13, 1e14]
    baseline = [3.0 * c ** -0.05 for c in budgets]
    variant = [3.0 * (2.5 * c) ** -0.05 for c in budgets]
    m = compute_multiplier(budgets, baseline, variant)
    assert m.estimate.value == pytest.approx(2.5, rel=1e-9)
    assert all(r["multiplier"] == pytest.approx(2.5, rel=1e-9) for r in m.per_budget)
    assert m.estimate.low == pytest.approx(2.5, rel=1e-6) and m.estimate.high == pytest.approx(2.5, rel=1e-6)
    steeper = [3.0 * (c / 2e13) ** -0.08 * 2e13 ** -0.05 for c in budgets]  # equal at 2e13
    m = compute_multiplier(budgets, baseline, steeper)
    assert m.per_budget[0]["multiplier"] < 1 < m.per_budget[-1]["multiplier"]
    assert m.trend.value < 0 and "largest budget" in m.estimate.method


def test_combined_verdict_needs_every_part():
    from testbed.study.base import combine

    reasons = {"disagree": "d", "agree": "a", "inconclusive": "i"}
    assert combine(["agree", "agree"], **reasons) == ("agree", "a")
    assert combine(["agree", "inconclusive"], **reasons) == ("inconclusive", "i")
    assert combine(["agree", "inconclusive", "disagree"], **reasons) == ("disagree", "d")
    assert combine([], **reasons) == ("inconclusive", "i")  # nothing measured is not agreement


def test_chinchilla_verdict_needs_every_approach():
    """Agree only when each approach's interval holds 0.5 and excludes 0.73; one approach
    excluding 0.5 makes it disagree; a missing interval leaves it inconclusive."""
    from testbed.study.base import Analysis, Measurement
    from testbed.study.builtin.chinchilla import verdict

    def approaches(*bands):
        ms = [Measurement(f"a in N_opt ∝ C^a, Approach {i + 1} (x)", v, lo, hi)
              for i, (v, lo, hi) in enumerate(bands)]
        return Analysis(ms[0], [*ms[1:], Measurement("b in D_opt ∝ C^b, Approach 1 (x)", 9.0, 8.0, 10.0)], {}, [])

    assert verdict(approaches((0.5, 0.4, 0.6), (0.52, 0.45, 0.6), (0.48, 0.3, 0.7)))[0] == "agree"
    assert verdict(approaches((0.5, 0.4, 0.6), (0.8, 0.75, 0.9), (0.48, 0.3, 0.7)))[0] == "disagree"
    assert verdict(approaches((0.5, 0.4, 0.6), (0.5, None, None), (0.48, 0.3, 0.7)))[0] == "inconclusive"
    assert verdict(approaches((0.6, 0.45, 0.8), (0.5, 0.4, 0.6), (0.48, 0.3, 0.7)))[0] == "inconclusive"


def test_chinchilla_minima_table_recovers_twenty_tokens_per_parameter():
    """IsoFLOP curves built with their minimum at D = 20 N come back as 20 tokens per parameter
    at each budget, and curves built at 60 tokens per parameter do not."""
    import numpy as np
    import pandas as pd

    from testbed.stats.curves import isoflop_slope
    from testbed.study.builtin.chinchilla import _minima

    def minima(tokens_per_parameter):
        rows = []
        for budget in (1e11, 4e11, 1.6e12):
            n_opt = (budget / (6 * tokens_per_parameter)) ** 0.5
            for n in n_opt * np.array([0.3, 0.5, 1.1, 2.0, 4.0]):
                rows.append({"N": n, "D": budget / (6 * n), "C": budget, "label_budget": budget,
                             "loss": 3 - 0.1 * np.log(budget / 1e11) + 0.2 * np.log(n / n_opt) ** 2})
        frame = pd.DataFrame(rows)
        estimate, _, info = isoflop_slope(frame["N"], frame["loss"], frame["label_budget"])
        assert estimate.value == pytest.approx(0.5, abs=1e-6)
        return _minima(frame, info)

    found = minima(20)
    assert len(found) == 3
    for m in found:
        assert m["tokens per parameter"] == pytest.approx(20, rel=1e-5) and m["inside the sizes"]
        assert m["N_opt"] == pytest.approx(m["N at 20 tokens per parameter"], rel=1e-5)
    assert all(m["tokens per parameter"] == pytest.approx(60, rel=1e-5) for m in minima(60))


def test_repetition_law_jacobian_matches_finite_differences():
    """The exact gradient the R_D* fit uses is the law's: central differences agree at points
    with and without repetition, for a small and a large R*."""
    import numpy as np

    from testbed.study.builtin.repetition import _law, _law_jacobian

    unique = np.array([1e5, 1e5, 1e5, 4e5, 1.6e6])
    repeats = np.array([0.0, 1.0, 15.0, 3.0, 0.0])
    for log_params in (np.log([1.5, 80.0, 0.25, 5.0]), np.log([0.01, 300.0, 0.4, 200.0])):
        exact = _law_jacobian(log_params, np.log(unique), repeats)
        for i in range(4):
            step = np.zeros(4)
            step[i] = 1e-6
            numeric = (_law(log_params + step, np.log(unique), repeats)
                       - _law(log_params - step, np.log(unique), repeats)) / 2e-6
            np.testing.assert_allclose(exact[:, i], numeric, rtol=1e-6, atol=1e-9)


def test_repetition_recovers_a_known_r_star():
    """The study's fit of L = E + B / D'^beta (Muennighoff et al.'s effective data D') recovers
    R_D* from losses made with it, on the study's own design (U repeated 1-16 epochs, unique
    controls), and tells a finite R_D* from repeated data worth its full count."""
    import numpy as np

    from testbed.study.builtin.repetition import _fit_r_star

    u = 98_304.0
    epochs = np.array([1, 2, 4, 8, 16, 2, 4, 8, 16] * 2, float)
    tokens = u * epochs
    unique = np.where(np.arange(len(epochs)) % 9 < 5, u, tokens)  # the repeated arm, then the controls

    def law(star):
        effective = unique * (1 + star * -np.expm1(-(tokens / unique - 1) / star))
        return 2.0 + 60.0 * effective ** -0.3

    noise = np.random.default_rng(0).normal(0, 1e-4, len(tokens))
    found = _fit_r_star(tokens, unique, law(5.0) + noise)
    assert found is not None and abs(found["R_D*"] / 5.0 - 1) < 0.2, found
    assert abs(found["beta"] - 0.3) < 0.05 and abs(found["E"] - 2.0) < 0.1, found
    unlimited = _fit_r_star(tokens, unique, 2.0 + 60.0 * tokens ** -0.3 + noise)
    assert unlimited["R_D*"] > 150, unlimited


def test_study_seeds_vary_the_data_order():
    """Wherever a study's sweep has train.seed as an axis, data.seed follows it; a sweep that
    sets the data order itself keeps it."""
    from testbed.study.builtin import wsd
    from testbed.study.sweeps import vary_data_order
    from testbed.sweep.spec import load_sweep

    runs = load_sweep(vary_data_order(wsd.sweeps("tiny")[0])).runs
    assert all(r.config.data.seed == r.config.train.seed for r in runs)
    spec = {"name": "s", "base": wsd.sweeps("tiny")[0]["base"],
            "grid": {"train.seed": [3, 4], "train.tokens": [4096]}}
    seeds = {(r.config.train.seed, r.config.data.seed) for r in load_sweep(vary_data_order(spec)).runs}
    assert seeds == {(3, 3), (4, 4)}
    fixed = {**spec, "derived": {"data.seed": 7}}
    assert {r.config.data.seed for r in load_sweep(vary_data_order(fixed)).runs} == {7}


def test_no_rule_decides_on_a_caveat():
    """A figure resting on an LR at the edge of its grid (or an optimum outside the sampled range)
    leaves every rule inconclusive, however far its interval lies from the tolerance."""
    from testbed.study.base import Measurement, at_most, within
    from testbed.study.builtin import ablation

    clear = Measurement("gap", 0.10, 0.08, 0.12)
    edged = Measurement("gap", 0.10, 0.08, 0.12, caveat="LR 0.012 is the highest of its grid")
    assert at_most(clear, 0.01) == "disagree" and within(clear, 0.01) == "disagree"
    assert at_most(edged, 0.01) == "inconclusive" and within(edged, 0.01) == "inconclusive"
    below = Measurement("multiplier", 0.65, 0.5, 0.8, "x")
    assert ablation.verdict(type("A", (), {"headline": below})())[0] == "disagree"
    below.caveat = "LR 0.012 is the highest of its grid"
    assert ablation.verdict(type("A", (), {"headline": below})())[0] == "inconclusive"


def test_library_domains_split_code_tests_and_docstrings():
    """The mixture study's three domains: no file is both library and tests, the docstrings are
    prose taken from the code (each a substring of some file), and the mini flavour is capped."""
    from testbed.study import corpus

    assert corpus._docstrings('"""Module."""\ndef f():\n    """Does f."""\nclass C:\n    pass\n') == "Module.\n\nDoes f."
    assert corpus._docstrings("def (:") == ""  # the test suite holds deliberately broken files
    library, tests = corpus.domain_texts("library", mini=True), corpus.domain_texts("tests", mini=True)
    assert library and tests and not set(library) & set(tests)
    assert any("def test" in text for text in tests) and not any(text.startswith("import unittest") for text in library)
    for domain in corpus.DOMAINS:
        texts = corpus.domain_texts(domain, mini=True)
        assert corpus.MINI_BYTES <= sum(len(t.encode()) for t in texts) < corpus.MINI_BYTES + 2_000_000
    path = corpus.domain_path("docstrings", 512, mini=True)
    assert corpus.parse(path) == {"corpus": "domain", "domain": "docstrings", "vocab_size": 512, "mini": True}


def test_the_writing_a_study_example_in_the_docs_runs_against_the_api(tmp_path, monkeypatch):
    """docs/studies.md's example (its custom norm swapped for a built-in one): its sweep expands,
    and its analysis measures a paired gap on final points shaped as ctx.finals gives them."""
    import pandas as pd

    from testbed.study.base import STUDIES as registry
    from testbed.study.base import Context
    from testbed.study.runner import _stated_vocabulary
    from testbed.sweep.spec import load_sweep

    # A fresh machine: no study corpus prepared. The sweep expands as `study plan` expands it,
    # with the vocabulary the corpus folder's name states.
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    text = (ROOT / "docs" / "studies.md").read_text().split("## Writing a study")[1]
    code = text.split("```python")[1].split("```")[0].replace("my_norm", "layernorm").replace('"mine"', '"doc-example"')
    namespace: dict = {}
    exec(compile(code, "docs/studies.md", "exec"), namespace)
    study = registry.get("doc-example")
    runs = load_sweep(_stated_vocabulary(study.sweeps("cpu")[0])).runs
    assert {r.config.model.norm for r in runs} == {"rmsnorm", "layernorm"} and len(runs) == 4
    finals = pd.DataFrame({"label_norm": ["rmsnorm", "rmsnorm", "layernorm", "layernorm"], "label_seed": [0, 1, 0, 1],
                           "loss": [3.0, 3.1, 2.9, 3.0]})
    monkeypatch.setattr(Context, "finals", lambda self, sweep=None: finals)
    headline = study.analyse(Context(tmp_path, "cpu", {})).headline
    assert headline.value < 0 and headline.low is not None and headline.high < 0
