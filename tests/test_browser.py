"""One real-browser test: the dashboard served by ``streamlit run``, driven by Debian's chromium.

It starts the server on a free port over the session's xtuner knowledge base,
opens Home, switches to Chat, asks "xtuner是什么？", waits for the streamed
answer and a citation, and saves screenshots under tests/artifacts/ (git
ignored). It prints (and writes to tests/artifacts/timings.json) the cold
start until Home is rendered, the time until the answer starts streaming, and
page switches once the models are loaded. Every wait is bounded and the
server is always terminated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from page_fixtures import BASE_ENV, llm_vars
from servers import free_port, stop, wait_for_http


ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
QUESTION = "xtuner是什么？"
NOTE = "Searching the knowledge base"

# JS: the text streamed so far into the last assistant message (not spinners, captions or sources)
STREAMED_JS = """(note) => {
  const msgs = [...document.querySelectorAll('[data-testid="stChatMessage"]')];
  const last = msgs[msgs.length - 1];
  if (!last || !last.querySelector('[data-testid="stChatMessageAvatarAssistant"]')) return '';
  const skip = '[data-testid="stSpinner"], [data-testid="stCaptionContainer"], [data-testid="stExpander"]';
  const md = [...last.querySelectorAll('[data-testid="stMarkdownContainer"]')]
    .filter(e => !e.closest(skip))
    .map(e => e.innerText.trim()).filter(t => t && !t.includes(note));
  return md.join('\\n');
}"""


@pytest.fixture
def server(xtuner_kb, default_gguf_path, tmp_path):
    """``streamlit run Home.py`` on a free port; yields (base URL, start time, process, log)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")
    port = free_port()
    env = dict(os.environ)
    env.pop("KB_EMBED_MODEL", None)
    env.update(BASE_ENV, **llm_vars(default_gguf_path), KB_HOME=str(xtuner_kb.settings.home),
               KB_LLM_PRELOAD="true")  # as in production: the model loads with the first page view
    streamlit = shutil.which("streamlit", path=str(Path(sys.executable).parent)) or "streamlit"
    log = tmp_path / "streamlit.log"
    cmd = [streamlit, "run", "Home.py", "--server.port", str(port), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    with log.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", started, proc, log
    finally:
        stop(proc)


def test_chat_in_a_real_browser(server):
    from playwright.sync_api import expect, sync_playwright

    base, started, proc, log = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    wait_for_http(f"{base}/_stcore/health", proc, log, timeout=180)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)
            # A bookmarked page opened first after a start goes through Home.py's navigation
            # (pages/_common.py through_navigation), not Streamlit's pages/ folder listing.
            page.goto(f"{base}/retrieval_lab", wait_until="domcontentloaded", timeout=60_000)
            page.get_by_role("heading", name="Retrieval lab").wait_for(timeout=180_000)
            nav = page.locator('[data-testid="stSidebarNav"]')
            nav.get_by_text("Admin", exact=True).wait_for(timeout=60_000)
            assert nav.get_by_role("link", name="common").count() == 0, nav.inner_text()
            timings["cold_start_to_deep_link_s"] = round(time.monotonic() - started, 2)
            nav.get_by_role("link", name="Home").click()
            page.get_by_role("heading", name="Knowledge base").wait_for(timeout=180_000)
            page.get_by_text("Live collection").first.wait_for(timeout=60_000)
            timings["cold_start_to_home_via_deep_link_s"] = round(time.monotonic() - started, 2)
            assert page.locator('[data-testid="stMetricValue"]').first.inner_text().strip() == "1", "one source"
            page.screenshot(path=str(ARTIFACTS / "browser-home.png"), full_page=True)

            t0 = time.monotonic()
            page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name="Chat").click()
            page.get_by_role("heading", name="Chat").wait_for()
            box = page.locator('[data-testid="stChatInput"] textarea')
            box.wait_for()
            timings["switch_home_to_chat_s"] = round(time.monotonic() - t0, 2)

            box.fill(QUESTION)
            t_ask = time.monotonic()
            box.press("Enter")
            page.wait_for_function(f"({STREAMED_JS})({json.dumps(NOTE)}).length > 0", timeout=300_000, polling=100)
            timings["ask_to_first_streamed_text_s"] = round(time.monotonic() - t_ask, 2)

            # the answer is complete when its sources are listed under it (the status box is an expander too)
            message = page.locator('[data-testid="stChatMessage"]').last
            message.get_by_text("read by the model").wait_for(timeout=300_000)  # the final render, not the status
            citation = message.locator('[data-testid="stExpander"]').filter(has_text="xtuner/").first
            timings["ask_to_answer_with_citations_s"] = round(time.monotonic() - t_ask, 2)
            answer = page.evaluate(f"({STREAMED_JS})({json.dumps(NOTE)})")
            assert answer.strip(), "an answer was rendered"
            label = citation.inner_text()
            assert "xtuner/" in label and "@" in label, label
            citation.locator("summary").click()
            link = citation.locator('a[href*="gitee.com/InternLM/xtuner/blob/"]').first
            link.wait_for()
            assert "#L" in (link.get_attribute("href") or "")
            facts = message.get_by_text("first word").inner_text()
            timings["first_word_after_asking_s"] = float(facts.split("first word")[1].split("s")[0])
            page.screenshot(path=str(ARTIFACTS / "browser-chat.png"), full_page=True)
            # a citation opens the Documents page at its file, with its lines highlighted
            cite = message.locator('a[href*="documents?source="]').first
            href = cite.get_attribute("href") or ""
            assert "lines=" in href, href
            with page.context.expect_page() as opened:
                cite.click()
            doc = opened.value
            doc.wait_for_load_state("domcontentloaded")
            marked = doc.locator(".st-key-docs_highlight")
            marked.wait_for(timeout=120_000)
            a, b = href.split("lines=")[1].split("&")[0].split("-")
            assert f"Lines {a}–{b}" in marked.inner_text()
            # scrolled into view by the page itself, once the lines around them are drawn (it fired early once)
            expect(marked).to_be_in_viewport(timeout=20_000)
            marked.scroll_into_view_if_needed()
            doc.wait_for_timeout(1500)  # let the page finish drawing around it
            doc.screenshot(path=str(ARTIFACTS / "browser-citation.png"), full_page=False)
            doc.reload()  # the deep link survives a reload
            doc.locator(".st-key-docs_highlight").wait_for(timeout=120_000)
            doc.close()
            page.reload()  # and so does the conversation, through its id in the URL
            page.locator('[data-testid="stChatMessage"]').nth(1).wait_for(timeout=120_000)
            assert "c=" in page.url, page.url
            page.screenshot(path=str(ARTIFACTS / "browser-chat.png"), full_page=True)

            # page switches once the models are loaded
            for name, heading in (("Retrieval lab", "Retrieval lab"), ("Home", "Knowledge base"), ("Chat", "Chat")):
                t0 = time.monotonic()
                page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=name).click()
                page.get_by_role("heading", name=heading).wait_for()
                if name == "Chat":  # the conversation is still there after the round trip
                    page.locator('[data-testid="stChatMessage"]').nth(1).wait_for()
                timings[f"switch_to_{name.lower().replace(' ', '_')}_warm_s"] = round(time.monotonic() - t0, 2)
        finally:
            browser.close()
    (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=1))
    print("\nbrowser timings:", json.dumps(timings))
    assert proc.poll() is None, "the server is still up"


def test_the_cited_lines_stay_in_view_while_the_page_grows_above_them():
    """SCROLL_JS on a bare page: the block scrolls into view once the page stands still, and again when the page
    goes on drawing above it afterwards (CI's machine: the lines above came after the first scroll, and the block
    ended off screen); a reader who scrolls first is left where they are."""
    from playwright.sync_api import sync_playwright

    from pages._highlight import HIGHLIGHT_KEY, SCROLL_JS

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")
    body = (f'<div data-testid="stMain"><div id="above" style="height:3000px"></div>'
            f'<div class="st-key-{HIGHLIGHT_KEY}" style="height:100px">cited</div>'
            f'<div style="height:3000px"></div></div>')
    in_view = ("() => { const r = document.querySelector('.st-key-" + HIGHLIGHT_KEY + "').getBoundingClientRect();"
               " return r.bottom > 0 && r.top < window.innerHeight; }")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.set_content(f"<html><body>{body}{SCROLL_JS}</body></html>")
            page.wait_for_function(in_view, timeout=5_000)  # scrolled once the page stood still
            page.wait_for_timeout(300)
            # the page draws 5,000 px more above the block, after the first scroll
            page.evaluate("() => { document.getElementById('above').style.height = '8000px'; }")
            assert not page.evaluate(in_view)  # pushed off screen ...
            page.wait_for_function(in_view, timeout=5_000)  # ... and brought back
            # a reader who scrolls is left where they are, even if the page grows again
            page.mouse.wheel(0, -2000)
            page.evaluate("() => { document.getElementById('above').style.height = '12000px'; }")
            page.wait_for_timeout(1500)
            assert not page.evaluate(in_view)
        finally:
            browser.close()
