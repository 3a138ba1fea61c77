"""The highlighted lines a citation points at: their bordered block, its style, and the script that scrolls to it.

Not a page. The Documents page draws a cited span with ``highlighted`` (in the
admin's view and in the read-only view of the cited lines alone) and calls
``scroll_to_highlight`` once per opened link.
"""

from __future__ import annotations

import streamlit as st

HIGHLIGHT = "_docs_highlight"  # {"key": "source/path", "lines": (a, b)}: the lines to highlight in that file
HIGHLIGHT_KEY = "docs_highlight"  # the highlighted lines' container; Streamlit gives it the class st-key-<key>
# Fixed markup, never built from document text or the URL: a style for the highlighted block and a script that
# scrolls it into view (st.html runs no script unless asked; this one only looks the block up and scrolls).
HIGHLIGHT_CSS = (
    f"<style>.st-key-{HIGHLIGHT_KEY} {{ border-color: #f0a020 !important; background: rgba(255, 189, 69, 0.12); }}"
    f" .st-key-{HIGHLIGHT_KEY} pre {{ background: rgba(255, 189, 69, 0.28) !important; }}</style>"
)
# The scroll waits for the page around the block to stop moving (three equal looks, 0.2 s apart), and scrolls again
# whenever the page stands still with the block out of view, until it has stood still for 3 s with the
# block in view (30 s at most; 12 s without the block). Fired at a fixed 0.4 s it ran before the lines above had been
# drawn in one of seven fresh opens (a browser review); scrolled once only, on CI's machine the page went on drawing
# above the block after it had settled for 0.4 s, and the block ended off screen. A reader who scrolls, clicks or
# types first is left where they are.
SCROLL_JS = (
    "<script>(function () {"
    f" var sel = '.st-key-{HIGHLIGHT_KEY}', last = '', same = 0, ticks = 0, moved = false, scrolled = false;"
    " ['wheel', 'touchmove', 'keydown', 'mousedown'].forEach(function (e) {"
    "  window.addEventListener(e, function () { moved = true; }, {once: true, passive: true, capture: true}); });"
    " var timer = setInterval(function () {"
    "  var el = document.querySelector(sel); ticks += 1;"
    "  if (moved || ticks > 150 || (!el && ticks > 60)) { clearInterval(timer); return; }"
    "  if (!el) { return; }"
    "  var main = document.querySelector('[data-testid=\"stMain\"]') || document.body;"
    "  var shape = main.scrollHeight + ':' + el.getBoundingClientRect().height + ':' + el.offsetTop;"
    "  same = shape === last ? same + 1 : 0; last = shape;"
    "  var box = el.getBoundingClientRect(), seen = box.bottom > 0 && box.top < window.innerHeight;"
    "  if (scrolled && seen && same >= 15) { clearInterval(timer); return; }"
    "  if ((same >= 2 && !(scrolled && seen)) || (!scrolled && ticks > 60)) { scrolled = true;"
    "   el.scrollIntoView({block: el.offsetHeight < 0.7 * window.innerHeight ? 'center' : 'start'}); }"
    " }, 200);"
    "})();</script>"
)


def highlighted(numbered: list[str], first: int, a: int, b: int, clear: bool = False) -> None:
    """Numbered lines from line ``first``, lines a–b of them in a bordered, highlighted block (the one SCROLL_JS
    scrolls to); ``clear``: with a button that drops the highlight."""
    before, marked, after = numbered[:a - first], numbered[a - first:b - first + 1], numbered[b - first + 1:]
    if before:
        st.code("\n".join(before), language=None, wrap_lines=True)
    with st.container(border=True, key=HIGHLIGHT_KEY):
        label = f":orange-background[**Lines {a}–{b}**] · the lines the link points at"
        if clear:
            c1, c2 = st.columns([5, 1], vertical_alignment="center")
            c1.markdown(label)
            if c2.button("Clear", key="docs_highlight_clear", help="show the file without the highlight"):
                st.session_state[HIGHLIGHT] = None
                st.rerun()
        else:
            st.markdown(label)
        st.code("\n".join(marked), language=None, wrap_lines=True)
    if after:
        st.code("\n".join(after), language=None, wrap_lines=True)
    st.html(HIGHLIGHT_CSS)


def scroll_to_highlight() -> None:
    """Scroll the highlighted block into view once the page around it stops moving (SCROLL_JS)."""
    st.html(SCROLL_JS, unsafe_allow_javascript=True)
