"""Chat sessions driven over Streamlit's own websocket, without a browser.

The load benchmark first drove one headless Chromium per asker. At 20 askers
the browsers took 20 of the run's 52 CPU-minutes on a two-core machine, so the
harness, not the dashboard, decided how many answers came back. Here each
asker is one websocket speaking Streamlit's protocol (the protobuf ``BackMsg``
and ``ForwardMsg`` the browser exchanges with the server): it opens the chat
page, types its question into the chat input (a widget state, as the browser
sends it) and reads the page's deltas as they stream. The suite's
real-browser test (tests/test_browser.py) covers what a person sees.

A row per asker: the time to the answer's first streamed text (the first
markdown written outside the stages box and captions, after the stages box
opened), the time to the answer's footer ("… s in all"), any error box the
page showed, and whether the session saw only its own question.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

DONE_TEXT = re.compile(r"\d s in all")
FIRST_WORD = re.compile(r"first word ([\d.]+) s after asking")


@dataclass
class Session:
    """What one websocket session has seen of its page."""

    question: str
    asked: float = 0.0
    first: float | None = None
    done: float | None = None
    error: str = ""
    footer_ttft_s: float | None = None  # what the page itself reports ("first word … s after asking")
    opened: bool = False  # the chat page's first run has finished
    texts: list[str] = field(default_factory=list)
    stages_paths: list[tuple[int, ...]] = field(default_factory=list)  # the stages boxes (expanders) opened

    def row(self) -> dict:
        return {
            "question": self.question, "error": self.error,
            "ttft_s": round(self.first - self.asked, 2) if self.first else None,
            "total_s": round(self.done - self.asked, 2) if self.done else None,
            "footer_ttft_s": self.footer_ttft_s,
        }


def _plain(text: str) -> str:
    """Text as compared: Markdown escapes, backticks and spacing aside."""
    return re.sub(r"[\s`\\]", "", text)


def _under(path: tuple[int, ...], prefixes: list[tuple[int, ...]]) -> bool:
    return any(path[: len(p)] == p for p in prefixes)


def _client_state(page_hash: str, widget_id: str | None = None, text: str = ""):
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ClientState_pb2 import ClientState
    from streamlit.proto.Common_pb2 import ChatInputValue
    from streamlit.proto.WidgetStates_pb2 import WidgetState, WidgetStates

    states = WidgetStates()
    if widget_id:
        states.widgets.append(WidgetState(id=widget_id, chat_input_value=ChatInputValue(data=text)))
    state = ClientState(query_string="", widget_states=states, page_script_hash=page_hash,
                        page_name="" if page_hash else "chat")
    return BackMsg(rerun_script=state).SerializeToString()


class _Page:
    """One session's page as its deltas arrive: the chat input's id, the chat page's hash, the run's end."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self.chat_input: str | None = None
        self.page_hash = ""
        self.finished = asyncio.Event()

    def read(self, raw: bytes) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        msg = ForwardMsg.FromString(raw)
        kind = msg.WhichOneof("type")
        if kind == "navigation" and msg.navigation.page_script_hash:
            self.page_hash = msg.navigation.page_script_hash
        elif kind == "new_session" and msg.new_session.page_script_hash and not self.page_hash:
            self.page_hash = msg.new_session.page_script_hash
        elif kind == "script_finished":
            self.finished.set()
        elif kind == "delta":
            self._delta(tuple(msg.metadata.delta_path), msg.delta)

    def _delta(self, path: tuple[int, ...], delta) -> None:
        s, now = self.s, time.monotonic()
        if delta.WhichOneof("type") == "add_block":
            if s.asked and delta.add_block.WhichOneof("type") == "expandable":
                s.stages_paths.append(path)
            return
        if delta.WhichOneof("type") != "new_element":
            return
        el = delta.new_element
        kind = el.WhichOneof("type")
        if kind == "chat_input":
            self.chat_input = el.chat_input.id
        elif kind == "alert" and el.alert.format == 1 and s.asked and not s.error:  # Alert.ERROR
            s.error = el.alert.body[:200]
        elif kind == "exception" and s.asked and not s.error:
            s.error = f"{el.exception.type}: {el.exception.message}"[:200]
        elif kind == "markdown":
            body = el.markdown.body
            s.texts.append(body)
            if not s.asked:
                return
            caption = el.markdown.element_type == 2  # Markdown.CAPTION
            if caption and DONE_TEXT.search(body):
                s.done = s.done or now
                m = FIRST_WORD.search(body)
                s.footer_ttft_s = float(m.group(1)) if m else None
            elif (not caption and s.first is None and s.stages_paths and body.strip()
                  and not _under(path, s.stages_paths) and body.strip() != s.question.strip()):
                s.first = now


async def _ask(url: str, session: Session, start: asyncio.Event, deadline: float) -> None:
    import websockets

    page = _Page(session)
    try:
        async with websockets.connect(url, subprotocols=["streamlit"], max_size=None, open_timeout=120,
                                      ping_interval=None) as ws:
            async def reader() -> None:
                async for raw in ws:
                    if isinstance(raw, bytes):
                        page.read(raw)

            task = asyncio.create_task(reader())
            await ws.send(_client_state(""))
            while page.chat_input is None:  # a first run may end early for a rerun (the model starting to load)
                page.finished.clear()
                try:
                    await asyncio.wait_for(page.finished.wait(), timeout=max(1.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise RuntimeError("the chat page showed no chat input") from None
            session.opened = True
            await start.wait()  # every session open before anyone asks, as the browser harness did
            page.finished.clear()
            session.asked = time.monotonic()
            await ws.send(_client_state(page.page_hash, page.chat_input, session.question))
            while session.done is None and not session.error and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.1)
            if task.done() and task.exception() and session.done is None:
                raise task.exception()
            task.cancel()
    except Exception as exc:  # a session that broke is an error of the run, counted, not fatal
        session.error = session.error or f"{type(exc).__name__}: {exc}"[:200]
    if session.done is None and not session.error:
        session.error = "no answer before the timeout"


async def _ask_all(url: str, questions: list[str], timeout_s: float) -> list[Session]:
    sessions = [Session(q) for q in questions]
    start, deadline = asyncio.Event(), time.monotonic() + timeout_s
    tasks = [asyncio.create_task(_ask(url, s, start, deadline)) for s in sessions]
    for _ in range(600):  # open every page first (each one's first run), then ask all at once
        if all(s.opened or s.error for s in sessions):
            break
        await asyncio.sleep(0.2)
    start.set()
    await asyncio.gather(*tasks)
    return sessions


def ask_all(base: str, questions: list[str], timeout_s: float) -> list[dict]:
    """Open one chat session per question over the websocket, ask them all at once, and time each answer."""
    url = base.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + "/_stcore/stream"
    sessions = asyncio.run(_ask_all(url, questions, timeout_s))
    rows = []
    for s in sessions:
        row = s.row()
        # answers never mix: a session's page shows its own question and no other asker's
        seen = [_plain(t) for t in s.texts]
        row["own_question_only"] = any(_plain(s.question) in t for t in seen) and not any(
            _plain(other.question) in t for other in sessions if other is not s for t in seen)
        rows.append(row)
    return rows
