"""A schedule defined outside the package, loaded by a config's `imports: [user_schedule]`
(tests/test_plugins.py): step decay, halving the learning rate every `halve_every` steps."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.errors import ConfigError
from testbed.schedules import SCHEDULES, Schedule


@SCHEDULES.register("test_halving")
@dataclass(frozen=True)
class Halving(Schedule):
    halve_every: int = 2

    def check(self, total_steps):
        if self.halve_every < 1:
            raise ConfigError(f"schedule.halve_every is {self.halve_every!r}; set it to 1 or more steps.")

    def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
        return peak_lr * 0.5 ** (step // self.halve_every)
