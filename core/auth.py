"""The admin lock of the dashboard, as plain Python (the Streamlit gate lives in pages/_common.py).

The password is ``admin_password`` in ``.streamlit/secrets.toml`` or
``KB_ADMIN_PASSWORD`` (``settings.admin_password``). With none set the admin
pages stay open and say so. A session that signed in keeps a token derived
from the password and the time of signing in with a per-process key, never the
password itself; it lasts ``admin_session`` (12 h by default: a tab left open
on a shared machine does not stay admin for days), and changing the password
(or restarting the server) signs every session out.
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


def session_token(settings: Settings, issued: int | None = None) -> str:
    """What a signed-in session keeps: when it signed in, tied to that time, this process and the current password."""
    issued = int(time.time()) if issued is None else issued
    return f"{issued}.{_mac(settings, issued)}"


def _mac(settings: Settings, issued: int) -> str:
    return hmac.new(_PROCESS_KEY, f"{issued}\0{settings.admin_password}".encode("utf-8"), hashlib.sha256).hexdigest()


def token_ok(settings: Settings, token: str | None) -> bool:
    return token_state(settings, token) == "ok"


def token_state(settings: Settings, token: str | None) -> str:
    """``ok``; ``expired`` for a genuine token older than ``admin_session``; ``none`` for no or a wrong token."""
    if not settings.admin_password or not token:
        return "none"
    issued, _, mac = token.partition(".")
    if not issued.isdigit() or not hmac.compare_digest(mac.encode(), _mac(settings, int(issued)).encode()):
        return "none"
    if settings.admin_session and time.time() - int(issued) > settings.admin_session:
        return "expired"
    return "ok"


def sign_in(settings: Settings, given: str | None) -> str | None:
    """The session token for a right password; None (after a short, serialised delay) otherwise."""
    if password_ok(settings, given):
        return session_token(settings)
    with _FAIL_LOCK:  # slows guessing down for everyone, without locking the real admin out
        time.sleep(FAIL_DELAY_S)
    return None
