"""Loaders and chunking: line numbers, headings, skips, Chinese separators, token lengths."""

from __future__ import annotations

import pytest

from core import embeddings as emb
from kb.ingest.chunking import ChunkConfig, make_splitter, split_document
from kb.errors import KBError
from kb.ingest.loaders import SkipFile, load_document, markdown_headings

from conftest import base_settings


def _split(text: str, config: ChunkConfig, path: str = "a.md", token_len=None):
    doc = load_document(path, text.encode(), 10**7)
    return doc, split_document(doc, source="s", commit="c0ffee", web_url="https://gitee.com/o/r", config=config,
                               embed_model="m", splitter=make_splitter(config, token_len))


def assert_lines_hold(doc_text: str, chunk) -> None:
    lines = doc_text.split("\n")
    window = "\n".join(lines[chunk.line_start - 1 : chunk.line_end])
    assert chunk.text in window, (chunk.line_start, chunk.line_end, chunk.text[:80])


def test_markdown_headings_skip_code_fences():
    lines = ["# A", "text", "```", "# not a heading", "```", "## B", "x", "# C"]
    assert markdown_headings(lines) == ["A", "A", "A", "A", "A", "A > B", "A > B", "C"]


def test_one_fence_pairing_serves_headings_code_blocks_and_excerpts():
    """Fences under a list item (indented past three spaces) and MyST's nesting pair alike everywhere: the loader's
    heading paths, the chunker's code blocks, an excerpt's lone fences and the support check read one pairing."""
    from kb.markdown import code_blocks, fence_partners, fenced_lines, is_fence

    lines = ["# Install", "1. Clone it:", "      ```shell", "      # Make sure git-lfs is installed",
             "      git lfs install", "      ```", "````{toggle}", "```shell", "# a log line", "```", "````", "## Next",
             "```x``` is inline"]
    assert markdown_headings(lines) == ["Install"] * 11 + ["Install > Next"] * 2
    assert fenced_lines(lines) == [False, False] + [True] * 9 + [False, False]
    assert fence_partners(lines) == {2: 5, 5: 2, 6: 10, 10: 6}
    assert [(b.opens, b.closes) for b in code_blocks("\n".join(lines[:6]))] == [(23, 99)]
    assert not is_fence(lines[-1]) and is_fence("  ~~~") and fenced_lines(["```", "open"]) == [True, True]


def test_lines_and_headings_are_exact():
    body = "\n".join(f"第{i}句话在这里。这是一个比较长的句子，用来测试切分。" for i in range(60))
    text = f"# 标题\n\n{body}\n\n## 小节\n\nEnglish text here. Another sentence!\n"
    doc, chunks = _split(text, ChunkConfig(size=120, overlap=30))
    assert len(chunks) > 5
    for c in chunks:
        assert_lines_hold(doc.text, c)
        assert c.url.endswith(f"#L{c.line_start}-L{c.line_end}")
    assert chunks[0].heading == "标题" and chunks[-1].heading == "标题 > 小节"


def test_chinese_breaks_after_full_stop():
    text = "。".join(["这是一段没有换行的很长的中文文本内容" * 2] * 30) + "。"
    _, chunks = _split(text, ChunkConfig(size=100, overlap=0), path="zh.txt")
    assert len(chunks) > 3
    assert all(c.text.endswith("。") for c in chunks[:-1])


def test_crlf_is_normalised():
    doc, chunks = _split("# T\r\n\r\nline one\r\nline two\r\n", ChunkConfig(size=100, overlap=0))
    assert doc.text == "# T\n\nline one\nline two"
    assert (chunks[0].line_start, chunks[0].line_end) == (1, 4)


def test_deterministic_ids_and_duplicates():
    text = "## Citation\n\nsame\n\n" + "x " * 300 + "\n\n## Citation\n\nsame\n"
    _, a = _split(text, ChunkConfig(size=50, overlap=0))
    _, b = _split(text, ChunkConfig(size=50, overlap=0))
    assert [c.id for c in a] == [c.id for c in b]
    assert len({c.id for c in a}) == len(a)


@pytest.mark.parametrize(
    "data,reason",
    [(b"\x00\x01binary", "binary"), (b"\xff\xfe\xfa bad", "not UTF-8"), (b"   \n", "empty"),
     ("\n".join(f"tok{i} x{i}" for i in range(2000)).encode(), "data file")],
)
def test_skipped_files_say_why(data, reason):
    with pytest.raises(SkipFile, match=reason):
        load_document("f.txt", data, 10**7)


def test_size_limit():
    with pytest.raises(SkipFile, match="too large"):
        load_document("f.md", b"x" * 101, 100)


def test_token_chunks_fit_the_window():
    settings = base_settings(__import__("pathlib").Path("/tmp"))
    count = emb.token_counter(settings)
    text = "\n\n".join(f"InternLM 是一个开源的大语言模型系列，第{i}段介绍它的训练与部署方法。" * 3 for i in range(40))
    config = ChunkConfig(size=128, overlap=16, unit="tokens")
    doc, chunks = _split(text, config, token_len=count)
    assert all(count(c.text) <= 128 for c in chunks)
    for c in chunks:
        assert_lines_hold(doc.text, c)


def test_markdown_splitter_prefers_headings():
    text = "# A\n\n" + "alpha words here. " * 20 + "\n\n## B\n\n" + "beta words here. " * 20
    _, chunks = _split(text, ChunkConfig(splitter="markdown", size=400, overlap=0))
    assert chunks[1].text.startswith("## B") and chunks[1].heading == "A > B"


@pytest.mark.parametrize("kw", [dict(size=10), dict(size=100, overlap=100), dict(splitter="x"), dict(unit="words")])
def test_bad_config(kw):
    with pytest.raises(KBError):
        ChunkConfig(**kw)


def test_passage_size_is_checked_and_none_keeps_older_names():
    assert ChunkConfig(size=400, overlap=40).hash == ChunkConfig(size=400, overlap=40, passage_size=0).hash
    assert "passage_size" not in ChunkConfig().to_json()  # collections built before passages keep their names
    withp = ChunkConfig(size=400, overlap=40, passage_size=120)
    assert withp.hash != ChunkConfig(size=400, overlap=40).hash and ChunkConfig.from_json(withp.to_json()) == withp
    for bad in (10, 401):
        with pytest.raises(KBError, match="passage size"):
            ChunkConfig(size=400, overlap=40, passage_size=bad)


@pytest.mark.parametrize("separator", ["\x0c", "\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b"])
def test_line_numbers_are_gits_around_unicode_separators(separator):
    """str.splitlines() breaks at these too; git does not, so every line after one was off by one."""
    raw = f"# Title\n\nbefore{separator}same line\nline 4\r\nline 5\rline 6\nlast line\n".encode()
    doc = load_document("notes.md", raw, 10_000)
    lines = doc.text.split("\n")
    assert len(lines) == raw.count(b"\n") + raw.replace(b"\r\n", b"").count(b"\r")  # git's count: LF, CRLF, bare CR
    assert lines[2] == f"before{separator}same line" and lines[3] == "line 4" and lines[6] == "last line"


def test_line_numbers_with_a_bom_and_without_a_final_newline():
    doc = load_document("a.txt", "\ufeffone\ntwo\x0cstill two\nthree".encode(), 10_000)
    assert doc.text.split("\n") == ["one", "two\x0cstill two", "three"]


def test_a_code_blocks_opening_goes_with_its_code():
    """MyST writes a blank line after a block's options, where the splitter breaks: a chunk ended on the fence and
    ":caption:", its command in the next one (67 of the six repos' 4,660 chunks), and answers copied the fence."""
    from kb.markdown import code_blocks

    intro = "XTuner supports direct fine-tuning of models from Hugging Face. " * 2
    command = "huggingface-cli download Qwen/Qwen3-8B --local-dir ./qwen3-8b\n" * 3
    text = (f"# Fine-tuning\n\n{intro}First download the model:\n\n```{{code-block}} bash\n"
            f":caption: Download Qwen3 8B model\n\n{command}```\n\nThen start training.\n")
    doc, chunks = _split(text, ChunkConfig(splitter="markdown", size=200, overlap=0))
    for c in chunks:
        assert_lines_hold(doc.text, c)
        assert all(b.code < len(c.text) for b in code_blocks(c.text)), c.text  # no chunk ends before its code
    holder = next(c for c in chunks if "huggingface-cli" in c.text)
    assert holder.text.startswith("```{code-block} bash\n:caption: Download Qwen3 8B model") and holder.line_start == 5
    assert chunks[0].text.endswith("First download the model:")


def test_fence_partners_and_open_fence_pair_a_files_part_as_the_whole_file_does():
    """An excerpt holds lines of a file: a fence whose partner lies outside them is told from one inside."""
    from kb.markdown import fence_partners, open_fence

    lines = ["```", "", "```{tip}", ":class: margin", "", "Enable it with `export X=1`", "```", "", "Then:",
             "```{code-block} shell", ":caption: Install", "pip install x"]
    # begun inside a block: its first fence closes it (-1), the tip pairs, the last block runs past the lines
    assert fence_partners(lines, "```") == {0: -1, 2: 6, 6: 2, 9: 12}
    # read alone, the first fence opens a block the tip's own closing fence ends: the prose reads as code
    assert fence_partners(lines) == {0: 6, 6: 0, 9: 12}
    whole = ["# Title", "````md", "```", "inner", "````", "x", "~~~", "y"]
    assert [open_fence(whole, i) for i in range(len(whole) + 1)] == [
        None, None, "````", "````", "````", None, None, "~~~", "~~~"]
    assert open_fence(lines, 1, opened="```") is None and open_fence(lines, 3, opened="```") == "```"


def test_code_blocks_pair_fences_as_commonmark_does():
    from kb.markdown import CodeBlock, code_blocks

    text = "````{toggle}\n```shell\nlog\n```\n````\n\n~~~\n:linenos:\n\nx\n~~~\n```\nopen"
    # the inner ``` block is the outer one's content; a tilde block's options and blank line come before its code
    outer, tilde = text.index("````\n\n"), text.rindex("~~~")
    assert code_blocks(text) == [
        CodeBlock(0, text.index("```shell"), outer, outer + 4),
        CodeBlock(text.index("~~~"), text.index("x\n~~~"), tilde, tilde + 3),
        CodeBlock(text.rindex("```"), text.index("open")),
    ]
