"""The one family of errors meant for people.

Every failure a person can fix (bad input, bad configuration, a server that
is down, a missing model part) is a :class:`UserError` or a subclass: the CLI
prints its message on one line and the pages show it in an error box. Any
other exception is a bug and keeps its traceback. It lives in ``core/``, the
bottom layer, so the settings, the model backends and ``kb/`` can all raise it
without importing upwards.
"""


class UserError(Exception):
    """An expected failure with a message meant for a person."""


class SettingsError(UserError):
    """A ``KB_*`` value or ``.streamlit/secrets.toml`` that can't be used."""
