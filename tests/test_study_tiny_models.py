"""Each architecture, optimiser and compute-allocation study run at tiny size and reported (study_tiny.run_tiny)."""

from __future__ import annotations

import pytest
from study_tiny import MODEL_STUDIES, run_tiny


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_STUDIES)
def test_tiny_run_and_report(tmp_path, name, monkeypatch):
    run_tiny(tmp_path, name, monkeypatch)
