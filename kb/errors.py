"""The one exception type for expected bad input and unreachable resources.

The CLI prints its message without a traceback and the pages show it as an
error box; anything else that escapes is a bug and keeps its traceback.
"""


class KBError(Exception):
    """An expected failure with a message meant for a person."""
