"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, a run directory in the wrong
state) raises `TestbedError` with one sentence naming the field, the value and the fix. The CLI
prints it without a traceback and exits with status 2, or with the error's own `exit_code`
where a subclass has one (rundir.RunDirBusy: exits.BUSY).
"""


class TestbedError(Exception):
    """An error caused by the user's input; the message says what to change."""

    __test__ = False  # not a pytest test class despite the name


class ConfigError(TestbedError):
    """A config key, type or value is wrong."""
