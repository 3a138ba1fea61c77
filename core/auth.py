"""The admin lock of the dashboard, as plain Python (the Streamlit gate lives in pages/_common.py).

The password is ``admin_password`` in ``.streamlit/secrets.toml`` or
``KB_ADMIN_PASSWORD`` (``settings.admin_password``). With none set the admin
pages stay open and say so. A session that signed in keeps a token derived
from the password with a per-process key, never the password itself; changing
the password (or restarting the server) signs every session out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

from core.settings import Settings

_PROCESS_KEY = secrets.token_bytes(32)
_FAIL_LOCK = threading.Lock()
FAIL_DELAY_S = 0.5  # per wrong password, serialised across sessions: at most ~2 guesses a second


def admin_locked(settings: Settings) -> bool:
    """True when an admin password is configured (the admin pages need it)."""
    return bool(settings.admin_password)


def password_ok(settings: Settings, given: str | None) -> bool:
    """Constant-time comparison with the configured password; False when none is set."""
    if not settings.admin_password or given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), settings.admin_password.encode("utf-8"))


def session_token(settings: Settings) -> str:
    """What a signed-in session keeps: tied to this process and to the current password."""
    return hmac.new(_PROCESS_KEY, settings.admin_password.encode("utf-8"), hashlib.sha256).hexdigest()


def token_ok(settings: Settings, token: str | None) -> bool:
    if not settings.admin_password or not token:
        return False
    return hmac.compare_digest(token, session_token(settings))


def sign_in(settings: Settings, given: str | None) -> str | None:
    """The session token for a right password; None (after a short, serialised delay) otherwise."""
    if password_ok(settings, given):
        return session_token(settings)
    with _FAIL_LOCK:  # slows guessing down for everyone, without locking the real admin out
        time.sleep(FAIL_DELAY_S)
    return None
