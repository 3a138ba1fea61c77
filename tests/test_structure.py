"""The layering of DESIGN §1, checked on the import graph of the source tree.

pages → kb → core, never upwards; Streamlit only in the UI layer (Home.py and
pages/); pages read the knowledge base through its facade, never through the
manifest, the Chroma index or chromadb itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

UI_FILES = [ROOT / "Home.py", *sorted((ROOT / "pages").glob("*.py"))]
LOGIC_FILES = sorted((ROOT / "core").rglob("*.py")) + sorted((ROOT / "kb").rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_tree_is_walked():
    assert len(LOGIC_FILES) > 20 and len(UI_FILES) >= 8
    assert {"ingest", "store", "search", "answer"} <= {p.name for p in (ROOT / "kb").iterdir() if p.is_dir()}


@pytest.mark.parametrize("path", LOGIC_FILES, ids=_rel)
def test_core_and_kb_never_import_streamlit(path):
    bad = sorted(m for m in imported_modules(path) if m == "streamlit" or m.startswith("streamlit."))
    assert not bad, f"{_rel(path)} imports {bad}: Streamlit belongs to Home.py and pages/"


@pytest.mark.parametrize("path", LOGIC_FILES, ids=_rel)
def test_imports_go_down_only(path):
    mods = imported_modules(path)
    upward = sorted(m for m in mods if m == "pages" or m.startswith("pages."))
    if path.is_relative_to(ROOT / "core"):
        upward += sorted(m for m in mods if m == "kb" or m.startswith("kb."))
    assert not upward, f"{_rel(path)} imports {upward}: imports go pages → kb → core"


@pytest.mark.parametrize("path", UI_FILES, ids=_rel)
def test_pages_only_use_the_facade(path):
    mods = imported_modules(path)
    bad = sorted(m for m in mods if m.startswith(("kb.store", "chromadb")) or m in ("kb.service.VectorIndex",))
    assert not bad, f"{_rel(path)} imports {bad}: pages ask KnowledgeBase for plain data"
    reach = sorted({
        f"line {n.lineno}: .{n.attr}"
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(n, ast.Attribute) and n.attr in {"manifest", "index", "client"}
        and isinstance(n.value, ast.Name) and n.value.id == "kb"
    })
    assert not reach, f"{_rel(path)} reaches past the facade: {reach}"


def test_one_error_family():
    """Every error meant for people derives from UserError, so pages and the CLI catch exactly that."""
    from core.embeddings import EmbeddingConfigError
    from core.errors import SettingsError, UserError
    from core.gguf import GGUFError
    from core.llm import LLMError
    from kb.errors import KBError

    for cls in (KBError, LLMError, GGUFError, EmbeddingConfigError, SettingsError):
        assert issubclass(cls, UserError) and not issubclass(cls, ValueError), cls
