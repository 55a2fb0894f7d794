"""The statistics fit/ and study/ share, one method per question, each named in what it returns.

- `intervals`: seed intervals (t intervals on the seed-to-seed variance pooled across a study's
  cells), paired and unpaired relative gaps, the spread of several means.
- `curves`: intervals for fitted curves by a parametric or wild cluster bootstrap of the residuals
  (never by resampling design points), the joint IsoFLOP fit, and the paired compute multiplier.
- `choice`: the learning rate chosen per cell without the winner's curse, and grid edges.

Every method has a coverage test on simulated data with a known answer (tests/test_stats.py).
"""

from testbed.stats.intervals import (
    LEVEL,
    Estimate,
    SeedNoise,
    mean_interval,
    paired_noise,
    relative_gap,
    seed_noise,
    spread,
)

__all__ = ["LEVEL", "Estimate", "SeedNoise", "mean_interval", "paired_noise", "relative_gap", "seed_noise", "spread"]
