"""testbed: a small-model pretraining testbed for scaling-law science."""

__version__ = "0.1.0"
