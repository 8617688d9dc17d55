"""Errors a user can fix, each reported by the command line as one line with its own exit code.

``less-eval``, ``less-train`` and ``less-report`` print ``<prog>: error: <message>`` on stderr and
exit with ``exit_code``; ``HYDRA_FULL_ERROR=1`` (or ``LESS_DEBUG=1``) shows the traceback as well.
"""


class LessError(Exception):
    """Base: a problem the message explains in terms of what to set or which file to fix."""

    exit_code = 2


class ConfigError(LessError, ValueError):
    """A config value, data file or checkpoint that cannot work; raised before any heavy work starts."""

    exit_code = 2


class UnavailableError(LessError, RuntimeError):
    """A model or data set that is neither available locally nor reachable on the hub."""

    exit_code = 3


class NonFiniteError(LessError, RuntimeError):
    """A NaN or infinity in logits, a metric or parameters: the result would be garbage, so none is kept."""

    exit_code = 4
