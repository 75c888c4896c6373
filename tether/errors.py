"""The one exception type a user sees: a one-line message naming the file, line or field at fault."""


class TetherError(Exception):
    """Bad input from the user (a config field, a data file line, a model folder).

    The CLI prints ``tether: <message>`` and exits with status 2, without a traceback.
    """

    exit_code = 2


class Interrupted(TetherError):
    """A run stopped by SIGINT or SIGTERM after writing a checkpoint; the message says how to resume it."""

    def __init__(self, signum: int, iteration: int, run_dir):
        import signal

        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at iteration {iteration}: checkpoint written; resume with: tether ppo --resume {run_dir}"
        )
        self.exit_code = 128 + signum
