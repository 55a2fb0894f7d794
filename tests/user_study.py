"""A user's own study, registered from outside the package: `testbed study run mine --import user_study`."""

from testbed.study.base import Analysis, Measurement, Study, register
from testbed.study.recipes import base


def sweeps(size):
    tree = base(size)
    tree["train"]["tokens"] = 4096
    return [{"name": "mine", "base": tree, "grid": {"optim.lr": [3e-3, 1e-2]}, "labels": ["optim.lr"]}]


def analyse(ctx):
    finals = ctx.finals("mine")
    return Analysis(Measurement("lowest loss", float(finals["loss"].min())))


register(Study(name="user-demo", version=1, paper="(none)", claim="A higher LR helps a tiny run.",
               sweeps=sweeps, analyse=analyse, verdict=lambda a: ("inconclusive", "a demo"),
               caveat="a demo study"))
