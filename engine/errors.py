"""The one exception type a user sees.

Anything raised as `SiftError` is something the user can fix (a bad file, a bad flag, a config
typo). The CLI prints it as a single line and exits 2; every other exception is a bug in sift and
keeps its traceback.
"""


class SiftError(Exception):
    """A user-facing error; its message must say what is wrong and where, in one line."""
