"""Bad input gives clear errors; dropped rows are counted, never silent."""

import numpy as np
import pandas as pd
import pytest

from testbed.errors import TestbedError
from testbed.fit.analysis import FitOptions, analyse
from testbed.fit.protocols.holdout import holdout_mask


def table(n=12):
    n_params = np.logspace(6, 8, n)
    tokens = 20 * n_params
    loss = 1.8 + 400 / n_params**0.34 + 1500 / tokens**0.36
    return pd.DataFrame({"params": n_params, "tokens": tokens, "val": loss})


def test_too_few_points_for_the_law():
    with pytest.raises(TestbedError, match="5 free parameters but only 4 points"):
        analyse(table(4), FitOptions(columns="N=params,D=tokens,loss=val"))


def test_missing_column_names_the_fix():
    with pytest.raises(TestbedError, match="--columns D=steps: the table has no column 'steps'"):
        analyse(table(), FitOptions(columns="N=params,D=steps,loss=val"))
    with pytest.raises(TestbedError, match="no column 'D'"):
        analyse(table().drop(columns="tokens"), FitOptions(columns="N=params,loss=val"))


def test_non_positive_and_nan_rows_are_counted():
    frame = table(14)
    frame.loc[0, "params"] = -5
    frame.loc[1, "val"] = np.nan
    frame.loc[2, "tokens"] = 0
    result = analyse(frame, FitOptions(columns="N=params,D=tokens,loss=val"))
    dropped = result.summary.dropped
    assert dropped == {"loss missing or not finite": 1, "N <= 0": 1, "D <= 0": 1}
    assert result.summary.n_points == 11


def test_bad_holdout_rule_and_unknown_law():
    frame = table().rename(columns={"params": "N", "tokens": "D", "val": "loss"}).assign(run_id=lambda f: f.index.astype(str))
    with pytest.raises(TestbedError, match="holds out every point"):
        holdout_mask(frame, "N>0")
    with pytest.raises(TestbedError, match="not understood"):
        holdout_mask(frame, "N is big")
    with pytest.raises(TestbedError, match="--law 'nope' is unknown"):
        analyse(frame, FitOptions(law="nope"))


def test_fixed_variant_without_a_value():
    with pytest.raises(TestbedError, match="--fix E=VALUE"):
        analyse(table(), FitOptions(columns="N=params,D=tokens,loss=val", variant="fixed_E"))
