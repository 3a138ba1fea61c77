"""Small Streamlit helpers shared by the pages: errors, the admin gate, progress, hit cards.

Not a page (st.navigation lists the pages explicitly in Home.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable

import streamlit as st

from core import auth
from core.errors import UserError
from core.settings import Settings
from kb.citations import location_md
from kb.markdown import escape_markdown, marked_snippet, plain_message
from kb.progress import STAGE_LABELS
from pages import _resources as resources


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures with a message meant for a person (the ``UserError`` family): an error box, never a traceback.

    Everything else is a bug: Streamlit shows it with its traceback.
    """
    return (UserError,)


def rerun_requested(requests=None) -> Callable[[], bool]:
    """Whether this script run has been asked to end: Stop pressed, a new question sent, the page left.

    Streamlit only ends a run at its next ``st`` call, and a chat answer makes
    none while the model reads its prompt (10-15 s on two cores); the model
    asks this instead (``Answerer.stream(stop_requested=...)``). It reads the
    run's request state as Streamlit's own yield point does
    (``ScriptRequests.on_scriptrunner_yield``: a rerun of a fragment elsewhere
    does not end the run). Streamlit has no public call for this, so any change
    in its internals reads as "not asked": the answer then ends at its first
    word, as before.
    """
    try:
        from streamlit.runtime.scriptrunner_utils.script_requests import (
            ScriptRequestType, _fragment_run_should_not_preempt_script,
        )
        from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx
    except ImportError:
        return lambda: False
    if requests is None:
        requests = getattr(get_script_run_ctx(), "script_requests", None)

    def asked() -> bool:  # llama.cpp calls this ~900 times per step of reading the prompt: no imports here
        try:
            state = requests._state
            if state == ScriptRequestType.STOP:
                return True
            data = requests._rerun_data
            return state == ScriptRequestType.RERUN and not _fragment_run_should_not_preempt_script(
                data.fragment_id_queue, data.is_fragment_scoped_rerun)
        except Exception:  # no run context (a bare script), or Streamlit's internals have moved
            return False

    return asked


def show_error(exc: BaseException) -> None:
    st.error(plain_message(str(exc)) or type(exc).__name__, icon=":material/error:")


def log_error(exc: BaseException, origin: str = "") -> None:
    """Record an unexpected error (a bug) in KB_HOME/logs; never raises (the real error matters more).

    Expected errors (``show_error``) are not logged here: a page shows them
    again on every rerun (the chat replays its history), and failed jobs are
    logged by the knowledge base itself.
    """
    try:
        from kb import log as runlog

        runlog.log_error(resources.settings(), exc, origin=origin or "page")
    except Exception:
        pass


@contextlib.contextmanager
def logging_errors(origin: str = ""):
    """Log an unexpected error raised inside, then let it go on to Streamlit (which shows its traceback).

    Streamlit's own st.stop/st.rerun are BaseExceptions, not errors: they pass untouched.
    """
    try:
        yield
    except expected_errors():
        raise
    except Exception as exc:
        log_error(exc, origin)
        raise


def through_navigation() -> None:
    """Run this page inside Home.py's ``st.navigation``, never alone.

    Streamlit treats a ``pages/`` folder as its first multipage API until the
    entry point has called ``st.navigation`` once in the process. So after a
    restart, a bookmarked page opened before anyone loads Home ran alone, with
    a sidebar listing every file in ``pages/`` (``_common.py`` too). Clearing
    that flag and rerunning sends the same URL through Home.py, which resolves
    it to this page with the real navigation. Streamlit offers no public
    switch for this (see its PR #10276); the flag is the one its
    ``st.navigation`` clears itself. Only a session's first run is checked:
    a page load carries no widget events that the rerun could drop.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if st.session_state.get("_through_navigation"):
        return
    st.session_state["_through_navigation"] = True
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def settings_or_stop() -> Settings:
    """Every page's first call (``require_admin`` makes it too), so it also routes the page (``through_navigation``)."""
    through_navigation()
    try:
        return resources.settings()
    except UserError as exc:  # a bad KB_* value or an unreadable secrets.toml (SettingsError)
        show_error(exc)
        st.stop()
        raise


def kb_or_stop(s: Settings | None = None):
    """The shared knowledge base, or an error box and the end of the page."""
    try:
        kb = resources.knowledge_base(s or settings_or_stop())
        kb.live()  # e.g. the live collection was embedded with another model
        kb.check_store()  # a Chroma server that is down: an error here, never an empty page
        return kb
    except expected_errors() as exc:
        show_error(exc)
        st.stop()
        raise


def interval(seconds: float) -> str:
    """An interval as a person writes it: 45 s, 15 min, 2 h, 1.5 h, 7 d."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 or seconds % 86400:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.0f} d"


def when(ts: float | None) -> str:
    if not ts:
        return "never"
    ago = time.time() - ts
    if ago < -90:  # a time to come (a retry, a scheduled run)
        rel = f"in {-ago / 60:.0f} min" if ago > -5400 else f"in {-ago / 3600:.0f} h"
    elif ago < 0:  # a retry due within the next 90 s is not "just now"
        rel = "in under 2 min"
    elif ago < 90:
        rel = "just now"
    elif ago < 5400:
        rel = f"{ago / 60:.0f} min ago"
    elif ago < 2 * 86400:
        rel = f"{ago / 3600:.0f} h ago"
    else:
        rel = f"{ago / 86400:.0f} days ago"
    return f"{dt.datetime.fromtimestamp(ts):%Y-%m-%d %H:%M} ({rel})"


# ---------------------------------------------------------------------------- admin gate

_TOKEN = "_admin_token"


def is_admin(s: Settings) -> bool:
    """This session may change the knowledge base: signed in, or no admin password is set."""
    return not auth.admin_locked(s) or auth.token_ok(s, st.session_state.get(_TOKEN))


def require_admin() -> Settings:
    """Stop the page unless this session is signed in as admin (or no password is configured)."""
    s = settings_or_stop()
    if not auth.admin_locked(s):
        st.warning(
            "**Admin pages are open to anyone who can reach this server**: no admin password is set. "
            "Set `admin_password` in `.streamlit/secrets.toml` or `KB_ADMIN_PASSWORD`.",
            icon=":material/lock_open:",
        )
        return s
    if auth.token_ok(s, st.session_state.get(_TOKEN)):
        with st.sidebar:
            if st.button(":material/logout: Sign out of admin", key="_admin_sign_out"):
                st.session_state.pop(_TOKEN, None)
                st.rerun()
        return s
    st.subheader(":material/lock: Admin sign-in")
    if auth.token_state(s, st.session_state.get(_TOKEN)) == "expired":
        st.info(f"Your admin sign-in has expired after {interval(s.admin_session)} (`KB_ADMIN_SESSION`): "
                "sign in again.", icon=":material/timer_off:")
    st.caption("This page changes or reveals the knowledge base. Chat and Retrieval lab are open to everyone.")
    with st.form("_admin_sign_in"):
        given = st.text_input("Admin password", type="password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        token = auth.sign_in(s, given)
        if token:
            st.session_state[_TOKEN] = token
            st.rerun()
        st.error("Wrong password.")
    st.stop()
    return s


# ---------------------------------------------------------------------------- progress

class StatusProgress:
    """A :class:`kb.progress.Progress` that drives one ``st.progress`` bar per stage inside an ``st.status``.

    Git reports clone/fetch progress from its own reader threads; the script's
    run context is attached to them so their updates reach this session.
    Updates are throttled so a fast loop doesn't flood the browser.
    """

    def __init__(self, status, min_interval: float = 0.15) -> None:
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        self.status = status
        self.bars: dict[str, object] = {}
        self.last: dict[str, float] = {}
        self.min_interval = min_interval
        self.stages: list[str] = []
        self._ctx = get_script_run_ctx()
        self._lock = threading.Lock()

    def __call__(self, stage: str, done: float, total: float | None = None, message: str = "") -> None:
        from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

        if get_script_run_ctx(suppress_warning=True) is None and self._ctx is not None:
            add_script_run_ctx(threading.current_thread(), self._ctx)
        with self._lock:
            now = time.monotonic()
            finished = total is not None and done >= total
            if stage in self.bars and not finished and now - self.last.get(stage, 0.0) < self.min_interval:
                return
            self.last[stage] = now
            label = STAGE_LABELS.get(stage, stage)
            if total:
                text = f"{label}: {done:,.0f} / {total:,.0f}"
                frac = min(1.0, max(0.0, done / total))
            else:
                text = f"{label}: {done:,.0f}" if done else f"{label}…"
                frac = 0.0
            if message:
                text += f" · {message[:90]}"
            if stage not in self.bars:
                self.stages.append(stage)
                with self.status:
                    self.bars[stage] = st.progress(frac, text=text)
            else:
                self.bars[stage].progress(frac, text=text)  # type: ignore[attr-defined]
            self.status.update(label=f"{label}…", state="running")


def run_with_status(label: str, fn, *, done_label: str | None = None, expanded: bool = True):
    """Run ``fn(progress)`` under an ``st.status`` box; expected errors end up in the box, not a traceback.

    Returns ``(result, error)``; exactly one of them is None.
    """
    with st.status(label, expanded=expanded) as status:
        progress = StatusProgress(status)
        t0 = time.perf_counter()
        try:
            result = fn(progress)
        except expected_errors() as exc:
            status.update(label=f"{label}: failed", state="error", expanded=True)
            show_error(exc)
            return None, exc
        except Exception as exc:  # a bug: logged, then shown by Streamlit with its traceback
            log_error(exc, origin=label)
            raise
        status.update(label=f"{done_label or label}: done in {time.perf_counter() - t0:.1f} s", state="complete",
                      expanded=False)
    return result, None


# ---------------------------------------------------------------------------- hits


def render_hit(hit, terms: list[str]) -> None:
    """One search hit as a card: rank, score, retrievers with their ranks, location, snippet."""
    with st.container(border=True):
        found = " · ".join(f"{m} #{r}" for m, r in hit.ranks.items()) or ", ".join(hit.found_by)
        rerank = f" · rerank {hit.scores['rerank']:.3f}" if "rerank" in hit.scores else ""
        st.markdown(f"**#{hit.rank}** &nbsp; score **{hit.score:.4f}** &nbsp; :gray[found by {found}{rerank}]")
        st.markdown(location_md(hit.source, hit.path, hit.line_start, hit.line_end, hit.commit, hit.url))
        if hit.heading:
            st.caption(escape_markdown(hit.heading))
        st.markdown(marked_snippet(hit.text, terms))
        with st.expander("Whole chunk", expanded=False):
            st.code(hit.text, language="markdown", wrap_lines=True)
            st.caption(f"id `{hit.id}`")


def snapshot_schedule_line(sched: dict) -> str:
    """The scheduled snapshots in one line: interval, how many are kept, the last and the next, or how to start them."""
    if not sched["every"]:
        return ("No scheduled snapshots: set `KB_SNAPSHOT_EVERY` (e.g. 1d) for one with the clones every interval, "
                "the newest `KB_SNAPSHOT_KEEP` (7) kept; `kb watch` writes them too.")
    return (f"Scheduled: a snapshot with the clones every {interval(sched['every'])} (`KB_SNAPSHOT_EVERY`), the "
            f"newest {sched['keep']} kept (`KB_SNAPSHOT_KEEP`; {sched['kept']} now, only `kb-snapshot-auto-*` "
            f"files are ever removed): last {when(sched['last_run'])}, next "
            + ("now" if sched["next_run"] <= time.time() + 5 else when(sched["next_run"]))
            + (" (once there is a live collection)" if not sched["kept"] else "") + ".")
