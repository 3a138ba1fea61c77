"""Answers with sources: an LCEL chain of rewrite → retrieve → prompt → stream.

The prompt keeps the original tutorial's rules (Chinese: answer only from the
context, say you don't know rather than invent), with the context numbered so
the model can cite ``[n]``; each marker maps back to a hit with path, lines
and commit.
When nothing passes the threshold the chain answers so plainly and the model
is never asked, so it can't invent.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import Runnable, RunnableBranch, RunnableLambda, RunnablePassthrough

from core.llm import reset_chat_model
from kb.retrieval import Hit, SearchEngine, SearchOptions

SYSTEM_RAG = "你是一个严谨的技术文档助手。只根据给出的资料回答问题；资料里没有答案时，就说你不知道，不要编造。"
# The rules come after the context, with a worked example of a marker: given
# the tutorial's wording (rules first, "用 [n] 标注") the default 1.5B model
# answered 3 of 6 test questions with a bare "[1]" or "[n]" and nothing else
# (README "Answers").
RAG_TEMPLATE = """资料：

{context}

问题：{question}

要求：
1. 只根据上面的资料回答；资料里没有答案，就说不知道，不要编造。
2. 先直接回答问题，一到三句话。问题是英文就用英文回答（If the question is in English, answer in English）。
3. 每句话末尾用方括号标出所依据的资料编号，例如：XTuner 支持 QLoRA 微调 [1]。
回答："""
CONDENSE_TEMPLATE = """根据下面的对话历史，把后续问题改写成一个不依赖历史、可以单独理解的问题。只输出改写后的问题，不要回答它。

对话历史:
{history}

后续问题: {question}
独立的问题:"""
SYSTEM_PLAIN = "你是一个乐于助人的助手。"
NO_HITS = "知识库中没有找到与这个问题相关的资料，所以我无法根据资料回答。可以换个问法，或在检索实验室里查看检索结果。"
MARKER_RE = re.compile(r"[\[【]\s*(\d+(?:\s*[,，、]\s*\d+)*)\s*[\]】]")

RAG_PROMPT = ChatPromptTemplate.from_messages([("system", SYSTEM_RAG), ("human", RAG_TEMPLATE)])
CONDENSE_PROMPT = ChatPromptTemplate.from_messages([("human", CONDENSE_TEMPLATE)])
PLAIN_PROMPT = ChatPromptTemplate.from_messages(
    [("system", SYSTEM_PLAIN), MessagesPlaceholder("history"), ("human", "{question}")]
)


@dataclass
class Answer:
    question: str
    answer: str
    sources: list[Hit] = field(default_factory=list)
    cited: list[int] = field(default_factory=list)  # 1-based source numbers the answer marks
    standalone_question: str = ""
    rag: bool = True
    seconds: float = 0.0
    first_token_seconds: float | None = None

    def as_dict(self) -> dict:
        return {
            "question": self.question, "standalone_question": self.standalone_question, "answer": self.answer,
            "rag": self.rag, "cited": self.cited, "seconds": self.seconds,
            "first_token_seconds": self.first_token_seconds,
            "sources": [
                {"n": i, **{k: h.as_dict()[k] for k in ("rank", "score", "mode", "source", "path", "line_start",
                                                         "line_end", "commit", "url", "text", "heading")}}
                for i, h in enumerate(self.sources, 1)
            ],
        }


def format_context(hits: list[Hit]) -> str:
    return "\n\n".join(
        f"[{i}] 来源: {h.source}/{h.path} 第 {h.line_start}-{h.line_end} 行\n{h.text}" for i, h in enumerate(hits, 1)
    )


def rag_inputs(hits: list[Hit], question: str) -> dict[str, str]:
    """What ``RAG_PROMPT`` is filled with; the chain and the answer benchmark share it."""
    return {"context": format_context(hits), "question": question}


def format_history(history: list[BaseMessage]) -> str:
    return "\n".join(f"{'用户' if isinstance(m, HumanMessage) else '助手'}: {m.content}" for m in history[-6:])


def marker_numbers(m: re.Match[str]) -> list[int]:
    """The source numbers of one ``MARKER_RE`` match: ``[2]``, ``[1, 3]``, ``【1、2】``."""
    return [int(n) for n in re.split(r"\s*[,，、]\s*", m.group(1))]


def cited_numbers(answer: str, n_sources: int) -> list[int]:
    """The ``[n]`` (also ``[1, 2]`` and ``【n】``) markers that name a real source."""
    found = {n for m in MARKER_RE.finditer(answer) for n in marker_numbers(m)}
    return sorted(n for n in found if 1 <= n <= n_sources)


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


def build_rag_chain(engine: SearchEngine, llm: BaseChatModel, options: SearchOptions) -> Runnable:
    """input {question, history} → streams {standalone}, {hits}, then {answer} pieces."""
    condense = RunnableBranch(
        (lambda x: bool(x["history"]),
         RunnableLambda(lambda x: {"history": format_history(x["history"]), "question": x["question"]})
         | CONDENSE_PROMPT | llm | StrOutputParser() | RunnableLambda(lambda s: s.strip().splitlines()[0] if s.strip() else "")),
        RunnableLambda(lambda x: x["question"]),
    )
    retrieve = RunnableLambda(lambda x: engine.search(x["standalone"] or x["question"], options))
    generate = RunnableBranch(
        (lambda x: not x["hits"], RunnableLambda(lambda x: NO_HITS)),
        RunnableLambda(lambda x: rag_inputs(x["hits"], x["question"]))
        | RAG_PROMPT | llm | StrOutputParser(),
    )
    return (
        RunnablePassthrough.assign(standalone=condense)
        | RunnablePassthrough.assign(hits=retrieve)
        | RunnablePassthrough.assign(answer=generate)
    )


def build_plain_chain(llm: BaseChatModel) -> Runnable:
    return RunnablePassthrough.assign(answer=PLAIN_PROMPT | llm | StrOutputParser())


class Answerer:
    """Runs the chains; ``stream`` yields answer text and fills in an :class:`Answer`."""

    def __init__(self, llm: BaseChatModel, engine: SearchEngine | None = None, options: SearchOptions | None = None) -> None:
        self.llm = llm
        self.engine = engine
        self.options = options or SearchOptions()

    def stream(self, question: str, history=None, rag: bool = True, options: SearchOptions | None = None,
               result: Answer | None = None) -> Iterator[str]:
        """Yield the answer as it is generated; ``result`` is completed when the stream ends."""
        result = result if result is not None else Answer(question=question, answer="")
        result.question, result.rag = question, rag
        t0 = time.perf_counter()
        reset_chat_model(self.llm)  # independent questions must not share llama.cpp state
        if rag:
            if self.engine is None:
                raise ValueError("RAG needs a search engine")
            chain = build_rag_chain(self.engine, self.llm, options or self.options)
        else:
            chain = build_plain_chain(self.llm)
        pieces: list[str] = []
        for part in chain.stream({"question": question, "history": to_messages(history)}):
            if "standalone" in part:
                result.standalone_question = part["standalone"]
            if "hits" in part:
                result.sources = part["hits"]
            if "answer" in part and part["answer"]:
                if result.first_token_seconds is None:
                    result.first_token_seconds = round(time.perf_counter() - t0, 3)
                pieces.append(part["answer"])
                yield part["answer"]
        result.answer = "".join(pieces).strip()
        result.cited = cited_numbers(result.answer, len(result.sources))
        result.seconds = round(time.perf_counter() - t0, 3)

    def ask(self, question: str, history=None, rag: bool = True, options: SearchOptions | None = None) -> Answer:
        result = Answer(question=question, answer="")
        for _ in self.stream(question, history, rag, options, result):
            pass
        return result
