"""Answers with sources: an LCEL chain of rewrite → retrieve → excerpts → prompt → stream → check.

The prompts live in ``kb/answer/prompts.py``; the model reads each hit's best
lines (``kb/answer/context.py``), and after it has written, each sentence is
tied to the lines that support it or flagged (``kb/answer/support.py``).
When nothing passes the threshold the chain declines in the question's
language, listing what it searched, and the model is never asked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable, RunnableBranch, RunnableLambda, RunnablePassthrough

from core.llm import prime_chat_model, token_counter
from core.settings import translate_mode
from kb.answer.context import CONTEXT_TOKENS, TokenCounter, estimate_tokens, excerpts, unit_embedder
from kb.answer.prompts import (
    CONDENSE_PROMPT, DECLINE, PLAIN_PROMPT, RAG_PROMPT, declines, echo_at, format_history, neutralise, rag_inputs,
    undecided_tail,
)
from kb.answer.support import Sentence, coverage, support
from kb.answer.translate import build_translate
from kb.citations import cited_numbers
from kb.errors import KBError
from kb.ingest.loaders import LoadedDocument, git_lines
from kb.markdown import open_fence
from kb.search.engine import SearchEngine
from kb.search.hits import Hit, SearchOptions
from kb.words import language_of
from kb.words import tokenize

STAGES = ("rewriting", "searching", "translated", "sources", "answering")  # "translated": only with a translation
# A follow-up that needs the conversation to be understood is short ("它支持哪些模型？"). A longer question carries its
# own context, and given one the small model answered it instead of rewriting it (a browser review: a 5,000-character
# second question was searched as "LMDeploy 是一个用于压缩、部署和服务 LLM 的工具…"), after reading it once more.
REWRITE_MAX_CHARS = 300
# A question this long (estimated tokens) leaves too little of the model's 4,096-token window (KB_LLM_N_CTX) for the
# rules, the excerpts and the answer: a browser review's 19 KB question was answered with one sentence repeated 23
# times, over 130 s, to the token limit. About 3,000 Latin or 1,400 Chinese characters.
MAX_QUESTION_TOKENS = 1000
# what the chat box takes at most: past MAX_QUESTION_TOKENS anyway, so the refusal says why, but no file of megabytes
# saved in the conversation before it (a second review: Streamlit's own limit is 200 MB)
MAX_QUESTION_CHARS = 8 * MAX_QUESTION_TOKENS


def rewrites(question: str, history: list) -> bool:
    """Whether the question is rewritten to stand alone before it is searched: a short follow-up."""
    return bool(history) and len(question) <= REWRITE_MAX_CHARS


def kept_rewrite(question: str, rewrite: str) -> str:
    """The rewrite, unless it has lost the question: then the question as asked.

    A rewrite adds what the conversation settles ("它" → "XTuner") and keeps the
    rest. After a declined off-topic question, the small model rewrote "what is
    lagent?" into "What is the term used to describe the artificial intelligence
    model?", and that was searched and answered (a browser review). A rewrite
    keeping fewer than half of the question's own words (``tokenize``: stop words
    and "它" drop out) is another question; a question of stop words alone ("why?")
    has nothing to lose and takes the rewrite.
    """
    words = set(tokenize(question))
    if not rewrite or (words and 2 * len(words & set(tokenize(rewrite))) < len(words)):
        return question
    return rewrite


@dataclass
class Answer:
    question: str
    answer: str
    sources: list[Hit] = field(default_factory=list)  # what the model read: each hit narrowed to its excerpt
    cited: list[int] = field(default_factory=list)  # 1-based source numbers the answer marks
    standalone_question: str = ""
    rag: bool = True
    seconds: float = 0.0
    first_token_seconds: float | None = None
    sentences: list[Sentence] = field(default_factory=list)
    declined: bool = False  # the chain's own "nothing here answers this"
    chunks: list[Hit] = field(default_factory=list)  # the whole chunks the retriever found
    # The model's answer when none of its claims was found in the sources: withheld behind the decline,
    # shown only on request and labelled unverified (``unverified_sentences``: its sentences, all unsupported).
    unverified: str = ""
    unverified_sentences: list[Sentence] = field(default_factory=list)
    also_as: str = ""  # the question in the other language, searched as well (kb/answer/translate.py)
    tokens: int | None = None  # the answer's length in the model's tokens (None: a remote model's tokenizer isn't here)

    def as_dict(self) -> dict:
        return {
            "question": self.question, "standalone_question": self.standalone_question, "answer": self.answer,
            "rag": self.rag, "cited": self.cited, "seconds": self.seconds,
            "first_token_seconds": self.first_token_seconds, "declined": self.declined,
            "unverified": self.unverified, "also_as": self.also_as, "tokens": self.tokens,
            "sentences": [s.as_dict() for s in self.sentences], "coverage": coverage(self.sentences),
            "sources": [
                {"n": i, **{k: h.as_dict()[k] for k in ("rank", "score", "mode", "source", "path", "line_start",
                                                         "line_end", "commit", "url", "text", "heading")}}
                for i, h in enumerate(self.sources, 1)
            ],
        }


def to_messages(history: list[tuple[str, str]] | list[BaseMessage] | None) -> list[BaseMessage]:
    """History as (role, text) pairs or messages; roles are 'user' and 'assistant'."""
    out: list[BaseMessage] = []
    for item in history or []:
        if isinstance(item, BaseMessage):
            out.append(item)
        else:
            role, text = item
            out.append(HumanMessage(text) if role == "user" else AIMessage(text))
    return out


def plain_history(history: list[BaseMessage]) -> list[BaseMessage]:
    """The conversation so far with its chat-template tokens made plain: a question asked earlier is as untrusted as
    this one (the answer chain's rewrite step formats it through ``format_history``, which does the same)."""
    return [m.model_copy(update={"content": neutralise(m.content)}) if isinstance(m.content, str) else m
            for m in history]


class LineReader:
    """A hit's lines as git numbers them, read from the file at its indexed commit (a few files kept)."""

    def __init__(self, kb, keep: int = 64) -> None:
        self.kb = kb
        self.keep = keep
        # per file: its lines as git numbers them, and the loader's document (its heading path per line)
        self._files: OrderedDict[tuple[str, str, str], tuple[list[str], LoadedDocument] | None] = OrderedDict()

    def _read(self, hit: Hit) -> tuple[list[str], LoadedDocument] | None:
        key = (hit.source, hit.path, hit.commit)
        if key not in self._files:
            try:
                doc = self.kb.read_document(hit.source, hit.path)
                self._files[key] = (git_lines(doc.text), doc)
            except (KBError, OSError, ValueError):  # a clone that lost the commit: the chunk's own text will do
                self._files[key] = None
            while len(self._files) > self.keep:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]

    def _file(self, hit: Hit) -> list[str] | None:
        read = self._read(hit)
        return None if read is None else read[0]

    def section(self, hit: Hit) -> list[str]:
        """The headings the hit's first line sits under in its file, outermost first (the loader's heading path)."""
        read = self._read(hit)
        path = read[1].heading_at(hit.line_start) if read is not None else ""
        return path.split(" > ") if path else []

    def open_fence(self, hit: Hit) -> str | None:
        """The fence of the code block the hit's first line sits in or closes (its chunk began inside the block)."""
        lines = self._file(hit)
        return None if lines is None else open_fence(lines, hit.line_start - 1)

    def __call__(self, hit: Hit) -> list[str]:
        lines = self._file(hit)
        if lines is None or hit.line_end > len(lines):
            return hit.text.split("\n")[: hit.line_end - hit.line_start + 1]
        return lines[hit.line_start - 1: hit.line_end]


def searched(question: str, hits: list[Hit]) -> str:
    """What a decline lists: the query, and the files it found (nothing that answered)."""
    files = list(dict.fromkeys(f"{h.source}/{h.path}" for h in hits))
    where = ", ".join(files[:5]) + (" …" if len(files) > 5 else "")
    return f"“{' '.join(neutralise(question).split())}”" + (f" → {where}" if where else "")


def withholds(answer: str, sentences: list[Sentence]) -> bool:
    """The answer makes claims and the sources hold none of them, or it only asks questions (the question
    written back), and it is no decline: shown as a decline."""
    claims = [s for s in sentences if s.claim]
    if not claims:
        return bool(sentences) and all(s.asks for s in sentences) and not declines(answer)
    return not any(s.supported for s in claims) and not declines(answer)


def decline_text(question: str, hits: list[Hit]) -> str:
    return DECLINE[language_of(question)].format(searched=searched(question, hits))


def build_rag_chain(engine: SearchEngine, llm: BaseChatModel, options: SearchOptions,
                    context_tokens: int = CONTEXT_TOKENS, lines_of: LineReader | None = None,
                    embed=None, count: TokenCounter | None = None, translate: bool | str = "off") -> Runnable:
    """input {question, history} → streams {standalone}, ({also_as},) {hits}, {excerpts}, then {answer} pieces.

    The answer step gets the standalone question, so a follow-up's "它" is
    already resolved; retrieval searches the same text, and with ``translate``
    its translation too (kb/answer/translate.py): "always", or "auto", only
    when BM25's and dense's first hits share no chunk (``retrievers_disagree``).
    """
    rewrite = (RunnableLambda(lambda x: {"history": format_history(x["history"]), "question": neutralise(x["question"])})
               | CONDENSE_PROMPT | llm | StrOutputParser()
               | RunnableLambda(lambda s: s.strip().splitlines()[0] if s.strip() else ""))
    condense = RunnableBranch(
        (lambda x: rewrites(x["question"], x["history"]),
         RunnablePassthrough.assign(rewrite=rewrite) | RunnableLambda(lambda x: kept_rewrite(x["question"], x["rewrite"]))),
        RunnableLambda(lambda x: x["question"]),
    )
    lines_of = lines_of or LineReader(engine.kb)
    embed = embed or unit_embedder(engine.kb.embeddings)

    def asked(x: dict) -> str:
        return x["standalone"] or x["question"]

    retrieve = RunnableLambda(lambda x: engine.search(
        asked(x), replace(options, also_as=x["also_as"]) if x.get("also_as") else options))
    count = count or token_counter(llm)
    narrow = RunnableLambda(lambda x: excerpts(x["hits"], asked(x), lines_of, embed, context_tokens, count,
                                               lines_of.open_fence))
    generate = RunnableBranch(
        (lambda x: not x["hits"], RunnableLambda(lambda x: decline_text(asked(x), []))),
        RunnableLambda(lambda x: rag_inputs([e.for_prompt() for e in x["excerpts"]], asked(x)))
        | RAG_PROMPT | llm | StrOutputParser(),
    )
    steps = RunnablePassthrough.assign(standalone=condense)
    mode = translate_mode(translate) if options.mode == "hybrid" else "off"  # only hybrid searches a translation
    if mode == "always":  # one model call before the search, only when asked for
        steps = steps | RunnablePassthrough.assign(also_as=RunnableLambda(asked) | build_translate(llm))
    elif mode == "auto":
        translated = build_translate(llm)

        def if_they_disagree(x: dict) -> str:
            question = asked(x)
            return translated.invoke(question) if engine.retrievers_disagree(question, options) else ""

        steps = steps | RunnablePassthrough.assign(also_as=RunnableLambda(if_they_disagree))
    return (
        steps
        | RunnablePassthrough.assign(hits=retrieve)
        | RunnablePassthrough.assign(excerpts=narrow)
        | RunnablePassthrough.assign(answer=generate)
    )


def build_plain_chain(llm: BaseChatModel) -> Runnable:
    return (RunnableLambda(lambda x: {"question": neutralise(x["question"]), "history": plain_history(x["history"])})
            | RunnablePassthrough.assign(answer=PLAIN_PROMPT | llm | StrOutputParser()))


def prime_answer_prompt(llm: BaseChatModel) -> bool:
    """Read the answer prompt's fixed part (its rules) into llama.cpp's cache before anyone asks.

    Every later question reuses those tokens, so without this only the first
    question of a server waits for them, and that is the one a new user asks.
    """
    return prime_chat_model(llm, RAG_PROMPT.format_messages(context="", question=""))


class StopSignal(threading.Event):
    """Stop for one answer: set when its reader closes the stream, or read from the caller's own check.

    A reader blocked while the model reads the prompt (10-15 s on two cores)
    can't close anything; ``requested`` lets the model ask the page instead
    whether the user has pressed Stop or asked again meanwhile.
    """

    def __init__(self, requested: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self._requested = requested

    def is_set(self) -> bool:
        return super().is_set() or bool(self._requested and self._requested())


class Answerer:
    """Runs the chains; ``stream`` yields answer text and fills in an :class:`Answer`.

    ``on_stage(stage, result)`` is told as each of ``STAGES`` begins, so a page
    can list the sources before the first word arrives.
    """

    def __init__(self, llm: BaseChatModel, engine: SearchEngine | None = None, options: SearchOptions | None = None,
                 context_tokens: int | None = None, translate: bool | str | None = None) -> None:
        self.llm = llm
        self.engine = engine
        self.options = options or SearchOptions()
        settings = getattr(getattr(engine, "kb", None), "settings", None)
        self.context_tokens = context_tokens or getattr(settings, "context_tokens", None) or CONTEXT_TOKENS
        # search the question's translation too (KB_TRANSLATE_QUESTIONS; kb/answer/translate.py)
        self.translate = translate_mode(getattr(settings, "translate_questions", "off") if translate is None
                                        else translate)
        # made on the first RAG answer and kept, so an evaluation run reuses the files it has read
        self._embed = None  # the embedding model as unit vectors
        self._lines: LineReader | None = None

    def stream(self, question: str, history=None, rag: bool = True, options: SearchOptions | None = None,
               result: Answer | None = None, on_stage=None,
               stop_requested: Callable[[], bool] | None = None) -> Iterator[str]:
        """Yield the answer as it is generated; ``result`` is completed when the stream ends.

        ``stop_requested()`` true ends the answer where it is, even before its first word.
        """
        result = result if result is not None else Answer(question=question, answer="")
        result.question, result.rag = question, rag
        if (size := estimate_tokens(question)) > MAX_QUESTION_TOKENS:
            raise KBError(f"the question is too long (about {size:,} tokens; at most {MAX_QUESTION_TOKENS:,} fit beside "
                          "its sources): ask about one thing at a time, and quote only the lines that matter")
        stage = on_stage or (lambda name, res: None)
        t0 = time.perf_counter()
        messages = to_messages(history)
        # Stop (the reader closes this generator): the model ends at its next token instead of writing on
        # to max_tokens, holding the one model while nobody reads
        cancel = StopSignal(stop_requested)
        llm = self.llm.bind(cancel_event=cancel) if getattr(self.llm, "supports_cancel", False) else self.llm
        if rag:
            if self.engine is None:
                raise ValueError("RAG needs a search engine")
            self._tools()
            chain = build_rag_chain(self.engine, llm, options or self.options, self.context_tokens,
                                    self._lines, self._embed, translate=self.translate)
        else:
            chain = build_plain_chain(llm)
        yield from self._run(chain, question, messages, result, stage, t0, cancel)
        count = token_counter(self.llm)  # for the log's "N tokens" (decode speed), once the answer is whole
        result.tokens = (count(result.answer) if result.answer else 0) if count else None
        if rag:
            self._check(result)
        result.seconds = round(time.perf_counter() - t0, 3)

    def _run(self, chain: Runnable, question: str, messages: list[BaseMessage], result: Answer, stage,
             t0: float, cancel: threading.Event) -> Iterator[str]:
        rag = result.rag
        stage("rewriting" if rag and rewrites(question, messages) else ("searching" if rag else "answering"), result)
        pieces: list[str] = []
        parts = chain.stream({"question": question, "history": messages})
        try:
            yield from self._collect(parts, result, stage, t0, pieces)
        finally:  # the model first, then the chain's stream, whose close waits for the model's thread
            cancel.set()
            parts.close()
        result.answer = "".join(pieces).strip()

    @staticmethod
    def _collect(parts, result: Answer, stage, t0: float, pieces: list[str]) -> Iterator[str]:
        """Yield the answer as it comes; a RAG answer ends where it starts writing the prompt back (an excerpt's
        label, the question line), and a line that may be such a start waits until it is decided."""
        shown = 0
        for part in parts:
            if "standalone" in part:
                result.standalone_question = part["standalone"]
                stage("searching", result)
            if "also_as" in part:
                result.also_as = part["also_as"]
                if result.also_as:
                    stage("translated", result)
            if "hits" in part:
                result.chunks = part["hits"]
            if "excerpts" in part:
                result.sources = [e.hit for e in part["excerpts"]]
                stage("sources", result)
                stage("answering", result)
            if "answer" in part and part["answer"]:
                if result.first_token_seconds is None:
                    result.first_token_seconds = round(time.perf_counter() - t0, 3)
                pieces.append(part["answer"])
                text = "".join(pieces)
                cut = echo_at(text) if result.rag else None
                if cut is not None:  # the caller's cancel then stops the model at its next token
                    pieces[:] = [text[:cut].rstrip()]
                    result.answer = pieces[0]
                    if len(pieces[0]) > shown:
                        yield pieces[0][shown:]
                    return
                result.answer = text
                ready = len(text) - (undecided_tail(text) if result.rag else 0)
                if ready > shown:
                    yield text[shown:ready]
                    shown = ready
        if len(result.answer) > shown:
            yield result.answer[shown:]

    def _tools(self) -> None:
        """The file reader and unit-vector embedder of RAG answers, made once per answerer."""
        if self._embed is None:
            self._embed = unit_embedder(self.engine.kb.embeddings)
            self._lines = LineReader(self.engine.kb)

    def _check(self, result: Answer) -> None:
        """Tie each sentence to its lines; an answer with nothing found in the sources becomes one sentence
        listing what was searched.

        That is the model declining, or the model answering although none of
        its claims is in the lines it read: on questions the sources can't
        answer, that is what a small model does (README "Answers"), and an
        answer nothing backs must not read like one that is. Its text is kept
        as ``unverified``, for a reader who wants to see it.
        """
        asked = result.standalone_question or result.question
        if not result.sources:
            result.declined = True
            return
        self._tools()
        result.sentences = support(result.answer, result.sources, self._embed, asked,
                                   [self._lines.section(h) for h in result.sources])
        claims = [s for s in result.sentences if s.claim]
        withheld = withholds(result.answer, result.sentences)
        if withheld or (declines(result.answer) and not any(s.supported for s in claims)):
            if withheld:
                result.unverified, result.unverified_sentences = result.answer, result.sentences
            result.answer = decline_text(asked, result.sources)
            result.sentences, result.declined = [], True
        result.cited = sorted({s.source for s in result.sentences if s.supported}
                              | set(cited_numbers(result.answer, len(result.sources))))

    def ask(self, question: str, history=None, rag: bool = True, options: SearchOptions | None = None) -> Answer:
        result = Answer(question=question, answer="")
        for _ in self.stream(question, history, rag, options, result):
            pass
        return result
