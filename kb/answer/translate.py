"""The question in the other language, searched as well (``SearchOptions.also_as``).

The docs hold many pages in one language only: a question asked in Chinese about an English-only page shares no
words with it, and BM25's Chinese words then outvote the one list (dense) that can find it. Searched also in the
other language, 79 cross-lingual questions of the registered sets found their gold within five hits 74 times
instead of 64 (README "Retrieval tuning", the forty-first stop's experiment). It costs one short generation, so it
is a choice (``KB_TRANSLATE_QUESTIONS``, the chat's toggle), not the default.
"""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable, RunnableLambda

from kb.answer.prompts import TRANSLATE_PROMPTS, neutralise
from kb.words import language_of

MAX_TOKENS = 40  # a question's translation fits; past it the model is explaining, not translating


def first_line(text: str, question: str) -> str:
    """The translation's first line; empty where the model gave none or wrote the question back."""
    line = next((line.strip() for line in text.strip().splitlines() if line.strip()), "")
    return "" if line.casefold() == question.strip().casefold() else line


def build_translate(llm: BaseChatModel | Runnable) -> Runnable:
    """question -> the question in the other language, greedy and short ('' when there is none)."""
    def prompt(question: str):
        return TRANSLATE_PROMPTS[language_of(question)].format_messages(question=neutralise(question))

    write = RunnableLambda(prompt) | llm.bind(max_tokens=MAX_TOKENS, temperature=0.0) | StrOutputParser()

    def translate(question: str) -> str:
        return first_line(write.invoke(question), question) if question.strip() else ""

    return RunnableLambda(translate)
