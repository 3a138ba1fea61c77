"""Answers with sources: an LCEL chain of rewrite → retrieve → prompt → stream.

The prompts live in ``kb/answer/prompts.py``; each ``[n]`` marker of the
answer maps back to a hit with path, lines and commit (``kb/citations.py``).
When nothing passes the threshold the chain answers so plainly and the model
is never asked, so it can't invent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable, RunnableBranch, RunnableLambda, RunnablePassthrough

from core.llm import reset_chat_model
from kb.answer.prompts import CONDENSE_PROMPT, NO_HITS, PLAIN_PROMPT, RAG_PROMPT, format_history, rag_inputs
from kb.citations import cited_numbers
from kb.search.engine import SearchEngine
from kb.search.hits import Hit, SearchOptions


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
