"""The one exception type a user sees: a one-line message naming the file, line or field at fault."""


class TetherError(Exception):
    """Bad input from the user (a config field, a data file line, a model folder).

    The CLI prints ``tether: <message>`` and exits with status 2, without a traceback.
    """
