"""The one exception type a user sees: a one-line message naming the file, line or field at fault."""


def first_line(error: Exception) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class TetherError(Exception):
    """Bad input from the user (a config field, a data file line, a model folder).

    The CLI prints ``tether: <message>`` and exits with status 2, without a traceback.
    """

    exit_code = 2


class Interrupted(TetherError):
    """A run stopped by SIGINT or SIGTERM after writing a checkpoint; the message says how to resume it."""

    def __init__(self, signum: int, where: str, command: str, run_dir):
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"{name} at {where}: checkpoint written; resume with: tether {command} --resume {run_dir}")
        self.exit_code = 128 + signum


class GuardStop(TetherError):
    """A guard (``kl_stop``) restored the last stable checkpoint and stopped training: the legacy API's ``step``
    raises it, as the tutorial's loop breaks out after ``load_state_dict(last_stable_checkpoint)``."""
