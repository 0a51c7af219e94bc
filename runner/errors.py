"""Errors that end a run with one clear line (no traceback).

Every user-facing failure -- a bad config key, a missing model, a malformed data line -- is
raised as a subclass of `UserError`. The entry point prints `error: <message>` on one line and
exits non-zero; nothing partial is written because the ledger is only touched after a trial ends.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the place."""

    exit_code = 2


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type, missing value, bad combination."""


class ModelError(UserError):
    """Model weights cannot be found, read, or are of an unsupported architecture."""


class HardwareUnavailable(UserError):
    """The requested backend or device is not present on this machine."""
