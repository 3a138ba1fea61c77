"""The answer prompts: the tutorial's rules, the numbered context, the follow-up rewrite.

The RAG prompt keeps the original tutorial's rules (Chinese: answer only from
the context, say you don't know rather than invent), with the context
numbered so the model can cite ``[n]``; each number maps back to a hit.
"""

from __future__ import annotations

from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

from kb.search.hits import Hit

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

RAG_PROMPT = ChatPromptTemplate.from_messages([("system", SYSTEM_RAG), ("human", RAG_TEMPLATE)])
CONDENSE_PROMPT = ChatPromptTemplate.from_messages([("human", CONDENSE_TEMPLATE)])
PLAIN_PROMPT = ChatPromptTemplate.from_messages(
    [("system", SYSTEM_PLAIN), MessagesPlaceholder("history"), ("human", "{question}")]
)


def format_context(hits: list[Hit]) -> str:
    return "\n\n".join(
        f"[{i}] 来源: {h.source}/{h.path} 第 {h.line_start}-{h.line_end} 行\n{h.text}" for i, h in enumerate(hits, 1)
    )


def rag_inputs(hits: list[Hit], question: str) -> dict[str, str]:
    """What ``RAG_PROMPT`` is filled with; the chain and the answer benchmark share it."""
    return {"context": format_context(hits), "question": question}


def format_history(history: list[BaseMessage]) -> str:
    return "\n".join(f"{'用户' if isinstance(m, HumanMessage) else '助手'}: {m.content}" for m in history[-6:])
