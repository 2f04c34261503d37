"""The errors that end a command with a message instead of a traceback (exit status 2). Kept free
of heavy imports, so that the command line can name them without starting JAX."""


class ConfigError(ValueError):
    """A configuration problem, found before any work: the message says what to change."""


class ResultsFolderError(ValueError):
    """A results folder that cannot take this run: unwritable, or holding another configuration."""


class FolderInUse(RuntimeError):
    """Another process holds a results folder's lock."""


class DamagedFile(ResultsFolderError):
    """A results file (a finished run, a checkpoint) that cannot be read back."""


class UnitsFailed(RuntimeError):
    """Units of an experiment that failed on a cluster while the others finished."""
