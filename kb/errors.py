"""Knowledge-base errors: the :class:`core.errors.UserError` family, raised by ``kb/``.

The CLI prints the message without a traceback and the pages show it as an
error box; anything that is not a ``UserError`` is a bug and keeps its
traceback.
"""

from core.errors import UserError


class KBError(UserError):
    """An expected knowledge-base failure: bad input, a missing source or collection, an unreachable server."""
