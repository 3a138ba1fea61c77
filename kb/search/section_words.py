"""The words documentation sections are named with, in Chinese and English.

A question in one language meets a README written only in the other
("Lagent 采用什么开源协议？" against Lagent's English README, whose section is
"License"). BM25 can't cross that, and the embedding model hardly ranks
section titles across languages (tried: README "Retrieval tuning"). The
titles of a project README's sections come from a small, stable vocabulary
(install, requirements, license, features, supported models, quick start,
citation), so a table of it, as BM25 words (jieba's for Chinese, lower-case
English), lets the README signals match a section in either language.
It is not a dictionary: only words that name what a README section is about.
"""

from __future__ import annotations

import functools

# Chinese BM25 word -> English BM25 words (the reverse direction is derived).
ZH_EN: dict[str, tuple[str, ...]] = {
    "安装": ("install", "installation", "setup"),
    "依赖": ("requirements", "dependencies", "dependency"),
    "要求": ("requirements", "requirement"),
    "环境": ("environment",),
    "配置": ("configuration", "config"),
    "协议": ("license",),
    "许可": ("license",),
    "许可证": ("license",),
    "开源": ("open", "source"),
    "商用": ("commercial",),
    "商业": ("commercial",),
    "引用": ("citation", "cite", "bibtex"),
    "特性": ("features", "feature"),
    "功能": ("features", "feature"),
    "亮点": ("highlights",),
    "支持": ("support", "supported"),
    "模型": ("model", "models"),
    "数据": ("data", "dataset", "datasets"),
    "评测": ("evaluation", "evaluate"),
    "评估": ("evaluation", "evaluate"),
    "部署": ("deploy", "deployment"),
    "推理": ("inference",),
    "微调": ("finetune", "fine", "tuning"),
    "训练": ("train", "training"),
    "量化": ("quantization", "quantize"),
    "教程": ("tutorial", "tutorials"),
    "文档": ("documentation", "docs"),
    "示例": ("example", "examples", "demo"),
    "例子": ("example", "examples"),
    "演示": ("demo",),
    "快速": ("quick", "quickstart"),
    "开始": ("start", "started", "quickstart"),
    "新闻": ("news",),
    "动态": ("news",),
    "更新": ("news", "updates", "update"),
    "性能": ("performance", "benchmark"),
    "异步": ("async", "asynchronous"),
    "调用": ("call", "calling", "invoke"),
    "工具": ("tool", "tools", "toolkit"),
    "智能": ("agent", "agents"),
    "贡献": ("contributing", "contribute"),
    "致谢": ("acknowledgement", "acknowledgements"),
    "下载": ("download",),
    "权重": ("weights",),
    "版本": ("version", "versions"),
    "接口": ("api", "interface"),
    "服务": ("serving", "server", "service"),
    "模态": ("multimodal", "modal"),
    "显卡": ("gpu", "gpus"),
    "昇腾": ("ascend",),
    "华为": ("huawei",),
    "中文": ("chinese",),
    "英文": ("english",),
    "常见问题": ("faq",),
}


@functools.cache
def _en_zh() -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for zh, ens in ZH_EN.items():
        for en in ens:
            out.setdefault(en, []).append(zh)
    return {en: tuple(zhs) for en, zhs in out.items()}


def _across(word: str) -> tuple[str, ...]:
    return ZH_EN.get(word) or _en_zh().get(word) or ()


@functools.cache
def equivalents(word: str) -> frozenset[str]:
    """The words naming the same kind of section: the other language's, and this language's other ones through
    them ("cite" finds a "Citation" heading by way of "引用"; "许可" a "协议" one by way of "license"). Empty for
    any other word."""
    other = set(_across(word))
    return frozenset(other.union(*(_across(o) for o in other)) - {word})
