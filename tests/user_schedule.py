"""Schedules defined outside the package, loaded by a config's `imports: [user_schedule]`
(tests/test_plugins.py, tests/test_schedules.py): step decay, halving the learning rate every
`halve_every` steps, and an exponential decay to `final_ratio` of the peak at the run's end. Each
declares its phases (`decays`): registering one that does not is refused."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.errors import ConfigError
from testbed.schedules import SCHEDULES, Schedule


@SCHEDULES.register("test_halving")
@dataclass(frozen=True)
class Halving(Schedule):
    halve_every: int = 2

    # Its value at a step does not depend on the run's length: stopping at any step gives what
    # a shorter run would have, so every step after warmup is stable (as inverse_sqrt's).
    decays = False

    def check(self, total_steps):
        if self.halve_every < 1:
            raise ConfigError(f"schedule.halve_every is {self.halve_every!r}; set it to 1 or more steps.")

    def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
        return peak_lr * 0.5 ** (step // self.halve_every)


@SCHEDULES.register("test_exp_decay")
@dataclass(frozen=True)
class ExpDecay(Schedule):
    final_ratio: float = 0.01

    # It reaches final_ratio at the run's end, so a point part-way is not a shorter run's end.
    decays = True

    def check(self, total_steps):
        if not 0 < self.final_ratio <= 1:
            raise ConfigError(f"schedule.final_ratio is {self.final_ratio!r}; set it in (0, 1].")

    def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
        p = min(max((step - self.warmup_steps) / max(total_steps - self.warmup_steps, 1), 0.0), 1.0)
        return peak_lr * self.final_ratio**p
