"""The one error type a user sees: `NanoforgeError` carries a one-line message naming what is wrong.

The CLI prints it as `error: <message>` and exits with status 2, never a traceback from a library.
"""


class NanoforgeError(Exception):
    """Bad input or a refused operation, explained in one line (file/record and what is wrong)."""
