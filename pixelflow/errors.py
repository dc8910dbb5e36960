"""Exit statuses of every command, and the failures that are reported as one line rather than a traceback.

User errors (bad config, data, checkpoint or CLI value) are ConfigError and its kin (USER_ERRORS, exit
status 2), all here so that a command imports nothing heavy to report them. A RunFailure is neither the
user's input nor a bug: the disk filled, a peer rank died or hung; it is one line too, with exit status 1,
and the newest committed checkpoint stays intact.
"""

from __future__ import annotations

EXIT_FINISHED = 0  # trained to train.steps
EXIT_FAILED = 1  # a failure: one line (RunFailure), or a bug's traceback
EXIT_USER_ERROR = 2  # bad config, data or checkpoint: one line on stderr says what and where
EXIT_STOPPED = 75  # stopped by a signal after a committed checkpoint: resume me (EX_TEMPFAIL)
EXIT_SIGNAL_BASE = 128  # killed by signal n: 128 + n, the shell's convention


class RunFailure(RuntimeError):
    """The run stopped for a reason outside its input and the code; the message says what and where."""


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN or infinite (train.nonfinite=stop); the message names the step."""


class ConfigError(ValueError):
    """A user error phrased as one line: a config key, a CLI value or an input that cannot work."""


class StorageError(OSError):
    """Storage kept failing after every retry; the message names the object."""


class ShardFormatError(ValueError):
    """A dataset file does not follow the shard format; the message names the file."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it."""


class ConversionError(ValueError):
    """A reference checkpoint that cannot be converted; the message lists what is wrong."""


# reported as one line with exit status 2 (EXIT_USER_ERROR) by every command
USER_ERRORS = (ConfigError, CheckpointError, ShardFormatError, ConversionError, StorageError, NonFiniteError)
