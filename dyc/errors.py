"""The one exception type the CLI turns into a clear one-line message."""


class DycError(Exception):
    """A user-facing error: bad input, a bad file, an impossible request.

    The CLI prints ``dyc: error: <message>`` on stderr and exits non-zero; it never
    shows a traceback for these.
    """
