"""Chat LLM backends behind LangChain's ``BaseChatModel``, chosen by ``settings.llm``.

- ``auto`` (default): the GGUF model (``KB_LLM_GGUF``, else the packaged
  Qwen2.5-Coder-1.5B-Instruct, joined on first use, see ``core.gguf``, so a fresh
  machine answers offline) through transformers in bfloat16 where the CPU
  multiplies bf16 (AMX or AVX512-BF16; ``core.gguf_checkpoint``: it reads a
  prompt about 5x (AMX) or 2x (AVX512-BF16) faster than llama.cpp there, and writes with the GGUF's own 4-bit blocks, ``core.decode_weights``),
  else through llama.cpp.
- ``llamacpp``: a GGUF file run in-process by llama-cpp-python.
- ``transformers``: a local checkpoint folder (the tutorial's InternLM2 / InternLM
  chat models) loaded with ``trust_remote_code`` because transformers >= 5 has no
  built-in InternLM2.
- ``openai``: any OpenAI-compatible server (LMDeploy ``api_server``, vLLM,
  ``python -m llama_cpp.server``) through ``langchain_openai.ChatOpenAI``.

Every model supports ``.invoke`` and ``.stream`` (real token streaming). Loading
is slow (seconds to minutes), so callers build a model once and cache it.
llama.cpp keeps the tokens it has evaluated and reuses the longest common
prefix of the next prompt (the answer prompt's rules), and a transformers model
keeps its last prompts' keys and values to the same end (``core.prompt_cache``),
so the chain no longer resets them between questions; ``reset_chat_model``
drops that state on demand.

Heavy libraries (llama_cpp, torch, transformers, openai) are imported only by the
backend that needs them, so e.g. the openai path never loads torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from core.errors import UserError
from core.gguf import GGUF_NAME, GGUFError, ensure_gguf
from core import decode_weights
from core.gguf_checkpoint import cpu_multiplies_bf16, ensure_checkpoint
from core.prompt_cache import PromptCache, feed_only_uncached
from core.settings import Settings, redact

BACKENDS = ("auto", "llamacpp", "transformers", "openai")


GENERATE_THREAD = "kb-transformers-generate"  # named, so a test can tell it from any other thread


class LLMError(UserError):
    """Bad LLM configuration or a model that can't be loaded; the message is for humans."""


# --------------------------------------------------------------------------- shutting down

_EXITING = threading.Event()


def _interpreter_exiting() -> None:
    """A stopped server's interpreter waits for every non-daemon thread, so answers still generating (or queued for
    the model) for browsers long gone kept a SIGTERM'd dashboard alive for minutes: they end at the next token."""
    _EXITING.set()


# ``threading._register_atexit`` (what concurrent.futures uses) runs before those threads are joined; ``atexit``
# runs after them, too late.
getattr(threading, "_register_atexit", lambda f: None)(_interpreter_exiting)


def _stopped(cancel: threading.Event | None) -> bool:
    """The user pressed Stop, or the process is exiting (``cancel``: anything with ``is_set()``)."""
    return _EXITING.is_set() or (cancel is not None and cancel.is_set())


def _stopped_chunk() -> ChatGenerationChunk:
    """What a stream stopped before its first word yields: LangChain's ``stream`` raises on a stream of nothing."""
    return _chunk("", finish_reason="stop")


def _refuse_when_exiting() -> None:
    if _EXITING.is_set():
        raise LLMError("the server is shutting down: ask again once it is back")


# --------------------------------------------------------------------------- messages


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ChatMessage):
        return message.role
    raise LLMError(f"unsupported message type for a chat prompt: {type(message).__name__}")


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the ``[{"role", "content"}]`` list chat templates expect."""
    return [{"role": _role(m), "content": m.text} for m in messages]


def _chunk(text: str, **metadata: Any) -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=text, response_metadata=metadata))


def _emit(
    text: str, run_manager: CallbackManagerForLLMRun | None, **metadata: Any
) -> ChatGenerationChunk:
    """Wrap one streamed piece and tell the callbacks, as LangChain expects of ``_stream``."""
    chunk = _chunk(text, **metadata)
    if run_manager and text:
        run_manager.on_llm_new_token(text, chunk=chunk)
    return chunk


# --------------------------------------------------------------------------- llama.cpp

_LLAMA_PASSTHROUGH = ("top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "seed")


class _Turns(BaseModel):
    """One question at a time at a model, with a count of those holding or waiting for it.

    A page shows a new question its place in the queue instead of a frozen spinner.
    """

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _queued: int = PrivateAttr(default=0)  # questions waiting for the model or being answered
    _count_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def queue_length(self) -> int:
        """How many questions hold or wait for the model now."""
        return self._queued

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """One question's turn at the model (one context serves one question at a time)."""
        with self._count_lock:
            self._queued += 1
        try:
            with self._lock:
                _refuse_when_exiting()
                yield
        finally:
            with self._count_lock:
                self._queued -= 1


class ChatLlamaCpp(_Turns, BaseChatModel):
    """A ``llama_cpp.Llama`` as a chat model, using the chat template stored in the GGUF.

    langchain-community's ChatLlamaCpp would pull in that whole package; this is
    the small part we need. A lock serialises calls because one Llama context
    can't serve two Streamlit sessions at once.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Any = Field(exclude=True)
    model_path: str
    max_tokens: int = 512
    temperature: float = 0.0
    _cancel: threading.Event | None = PrivateAttr(default=None)  # the current turn's Stop, read by llama.cpp
    _abort_fn: Any = PrivateAttr(default=None)  # the ctypes callback, kept alive: llama.cpp holds only its address

    @property
    def _llm_type(self) -> str:
        return "llamacpp"

    @contextlib.contextmanager
    def _abortable(self, cancel: threading.Event | None) -> Iterator[Callable[[], None]]:
        """Let Stop (or the process exiting) end llama.cpp's reading of the prompt, not only its writing.

        Reading a 900-token prompt takes 10-15 s on two cores, and a token loop
        only sees Stop after it. llama.cpp asks an abort callback between the
        steps of its compute graph; asking it costs nothing on an idle machine
        but takes the GIL ~900 times per step, which slowed decoding by a third
        beside a busy Python thread, so the caller calls the yielded function to
        drop the callback once the first token is out (the token loop checks
        Stop itself from there). An aborted read raises in llama.cpp and leaves
        the cache without that prompt's tail, so the evaluated tokens are
        forgotten; the next question reads its rules again (about 2 s).
        """
        ctx = getattr(self.client, "ctx", None)
        # Not a llama_cpp.Llama (a test double), or the main thread, where Ctrl-C would land inside the callback
        # and be lost: the token loop still checks Stop.
        if ctx is None or threading.current_thread() is threading.main_thread():
            yield lambda: None
            return
        import llama_cpp

        if self._abort_fn is None:
            self._abort_fn = llama_cpp.ggml_abort_callback(lambda _data: _stopped(self._cancel))
        none = ctypes.cast(None, llama_cpp.ggml_abort_callback)
        watching = [True]

        def drop() -> None:  # called for every token: a C call only the first time
            if watching[0]:
                watching[0] = False
                llama_cpp.llama_set_abort_callback(ctx, none, None)

        self._cancel = cancel
        llama_cpp.llama_set_abort_callback(ctx, self._abort_fn, None)
        try:
            yield drop
        except RuntimeError:  # "llama_decode returned 2": aborted while reading the prompt
            self.client.reset()
            if cancel is None or not cancel.is_set():
                _refuse_when_exiting()
                raise
        finally:
            llama_cpp.llama_set_abort_callback(ctx, none, None)
            self._cancel = None

    supports_cancel: ClassVar[bool] = True  # ``.bind(cancel_event=threading.Event())`` stops a generation

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "max_tokens": self.max_tokens, "temperature": self.temperature}

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Per-call options (``.stream(msgs, max_tokens=32)`` or ``.bind(...)``) over the defaults."""
        params = {k: kwargs[k] for k in _LLAMA_PASSTHROUGH if k in kwargs}
        return {
            **params,
            "max_tokens": kwargs.get("max_tokens", self.max_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "stop": stop or kwargs.get("stop"),
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        with self._turn(), self._abortable(None):  # a follow-up's rewrite: ended only by the process exiting
            out = self._complete(messages, stream=False, **self._params(stop, kwargs))
        choice, usage = out["choices"][0], out.get("usage") or {}
        message = AIMessage(
            content=choice["message"].get("content") or "",
            response_metadata={"finish_reason": choice.get("finish_reason"), "model_name": self.model_name},
            usage_metadata={
                "input_tokens": usage.get("prompt_tokens", 0),
                "output_tokens": usage.get("completion_tokens", 0),
                "total_tokens": usage.get("total_tokens", 0),
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        cancel, sent = kwargs.get("cancel_event"), False
        with self._turn(), self._abortable(cancel) as prompt_read:
            for part in self._complete(messages, stream=True, **self._params(stop, kwargs)):
                prompt_read()
                if _stopped(cancel):  # Stop: llama.cpp ends when its generator is dropped
                    break
                choice = part["choices"][0]
                text, finish = choice["delta"].get("content") or "", choice.get("finish_reason")
                if finish:
                    sent = True
                    yield _emit(text, run_manager, finish_reason=finish, model_name=self.model_name)
                elif text:
                    sent = True
                    yield _emit(text, run_manager)
        if not sent:
            yield _stopped_chunk()

    def _complete(self, messages: list[BaseMessage], **params: Any) -> Any:
        try:
            out = self.client.create_chat_completion(messages=to_chat_dicts(messages), **params)
        except ValueError as exc:  # e.g. "Requested tokens (5000) exceed context window of 4096"
            raise LLMError(f"llama.cpp: {exc}") from exc
        return _llama_errors(out) if params.get("stream") else out

    @property
    def model_name(self) -> str:
        return Path(self.model_path).name

    def get_num_tokens(self, text: str) -> int:
        """The GGUF's own tokenizer (LangChain's default would fetch GPT-2's from the hub)."""
        return len(self.client.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def reset(self) -> None:
        """Forget the evaluated tokens so the next question starts from a clean context."""
        with self._lock:
            self.client.reset()


def _llama_errors(parts: Iterator[Any]) -> Iterator[Any]:
    """A streamed completion only checks the prompt length once read, so wrap its errors too."""
    try:
        yield from parts
    except ValueError as exc:
        raise LLMError(f"llama.cpp: {exc}") from exc


def resolve_gguf(settings: Settings) -> Path:
    """The GGUF file to run: ``KB_LLM_GGUF`` if set, else the packaged model in home/models."""
    if settings.llm_gguf:
        path = Path(settings.llm_gguf).expanduser()
        if not path.is_file():
            raise LLMError(f"KB_LLM_GGUF={settings.llm_gguf}: no such file")
        return path
    try:
        return ensure_gguf(settings.models_path)
    except GGUFError as exc:
        raise LLMError(f"cannot prepare the default model: {exc}") from exc


def llm_threads(settings: Settings) -> int:
    """Threads for CPU inference: the setting, or every core (0 means all)."""
    return settings.llm_threads if settings.llm_threads > 0 else (os.cpu_count() or 1)


def _build_llamacpp(settings: Settings) -> ChatLlamaCpp:
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise LLMError(f"KB_LLM=llamacpp needs llama-cpp-python: pip install llama-cpp-python==0.3.36 ({exc})") from exc

    path, threads = resolve_gguf(settings), llm_threads(settings)
    try:
        client = Llama(
            model_path=str(path),
            n_ctx=settings.llm_n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            # Flash attention reads a prompt about 8 % faster on two cores (80 against 74 tok/s, README
            # "Answers"), and the first token waits on reading the prompt.
            flash_attn=True,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise LLMError(f"llama.cpp cannot load {path}: {exc} (is it a GGUF model file?)") from exc
    return ChatLlamaCpp(
        client=client,
        model_path=str(path),
        max_tokens=settings.llm_max_tokens,
        temperature=settings.llm_temperature,
    )


# --------------------------------------------------------------------------- transformers


class ChatTransformers(_Turns, BaseChatModel):
    """A local transformers causal LM as a chat model, streamed through TextIteratorStreamer.

    The prompt comes from the tokenizer's chat template when it has one; InternLM
    checkpoints without one bring their own ``stream_chat``/``chat`` methods in
    their remote code, and ``mode`` records which path is used.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any = Field(exclude=True)
    tokenizer: Any = Field(exclude=True)
    model_path: str
    mode: str = "template"  # template | stream_chat | chat
    max_tokens: int = 512
    temperature: float = 0.0
    prompt_lookup: int = 0  # tokens drafted per step from the prompt (transformers' prompt lookup); 0: off
    _prompt_cache: PromptCache = PrivateAttr(default_factory=PromptCache)
    supports_cancel: ClassVar[bool] = True  # ``.bind(cancel_event=...)``: Stop ends generation at the next token

    @property
    def _llm_type(self) -> str:
        return "transformers"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "mode": self.mode, "max_tokens": self.max_tokens}

    def get_num_tokens(self, text: str) -> int:
        """The checkpoint's own tokenizer (LangChain's default would fetch GPT-2's from the hub)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        text = "".join(c.text for c in self._stream(messages, stop, None, **kwargs))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        temperature = kwargs.get("temperature", self.temperature)
        cancel = kwargs.get("cancel_event")
        with self._turn():
            if self.mode == "template":
                pieces = self._stream_template(messages, stop, max_tokens, temperature)
            else:
                pieces = self._stream_remote(messages, max_tokens, temperature)
            sent = False
            try:
                for text in pieces:
                    if _stopped(cancel):
                        break
                    if text:
                        sent = True
                        yield _emit(text, run_manager)
                if not sent:
                    yield _stopped_chunk()
            finally:
                close = getattr(pieces, "close", None)
                if close:  # the template streamer's reader stops generation at the next token
                    close()

    def _sampling(self, max_tokens: int, temperature: float) -> dict[str, Any]:
        if temperature > 0:
            return {"max_new_tokens": max_tokens, "do_sample": True, "temperature": temperature}
        return {"max_new_tokens": max_tokens, "do_sample": False}

    def _stream_template(
        self, messages: list[BaseMessage], stop: list[str] | None, max_tokens: int, temperature: float
    ) -> Iterator[str]:
        """Generate in a thread and read decoded text from the streamer as it arrives."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        inputs = self.tokenizer.apply_chat_template(
            to_chat_dicts(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        gen_kwargs: dict[str, Any] = {**inputs, **self._sampling(max_tokens, temperature), "streamer": streamer}
        gen_kwargs["eos_token_id"] = turn_end_ids(self.tokenizer, self.model)
        if self.prompt_lookup and drafts_from_prompt(self.model):
            gen_kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        prompt = inputs["input_ids"][0]
        if cuts_cache(self.model):
            gen_kwargs["cache"] = self._cache_for(prompt)
        if self.tokenizer.pad_token_id is None:
            gen_kwargs["pad_token_id"] = self.tokenizer.eos_token_id
        if stop:
            gen_kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        cancelled, errors = threading.Event(), []
        gen_kwargs["stopping_criteria"] = StoppingCriteriaList([_cancel_criterion(cancelled)])
        worker = threading.Thread(target=_generate_into, args=(self.model, gen_kwargs, streamer, errors), daemon=True,
                                  name=GENERATE_THREAD)
        worker.start()
        try:
            yield from streamer
        finally:  # a reader that stops early stops generation at the next token
            cancelled.set()
            worker.join()
            if not errors and "cache" in gen_kwargs:
                self._prompt_cache.give_back(prompt, gen_kwargs["cache"])
        if errors:
            raise LLMError(f"generation failed in {self.model_path}: {errors[0]}") from errors[0]

    def _cache_for(self, prompt: Any) -> Any:
        """A cache already holding the longest prefix of ``prompt`` this model has read, else an empty one."""
        from transformers import DynamicCache

        feed_only_uncached(self.model)
        cache, _ = self._prompt_cache.take(prompt)
        return cache if cache is not None else DynamicCache(config=self.model.config)

    def reset(self) -> None:
        """Forget the prompts read so far (the next one is read in full)."""
        self._prompt_cache.clear()

    def _stream_remote(self, messages: list[BaseMessage], max_tokens: int, temperature: float) -> Iterator[str]:
        """Use the checkpoint's own ``stream_chat``/``chat`` (InternLM remote code)."""
        system, history, query = split_for_internlm(messages)
        kwargs: dict[str, Any] = {"history": history, **self._sampling(max_tokens, temperature)}
        method = getattr(self.model, self.mode)
        if system and _accepts(method, "meta_instruction", via=getattr(self.model, "chat", None)):
            kwargs["meta_instruction"] = system
        if self.mode == "chat":
            response, _ = method(self.tokenizer, query, **kwargs)
            yield response
            return
        sent = ""
        for response, _ in method(self.tokenizer, query, **kwargs):
            # stream_chat yields the whole response so far; pass on only what's new
            yield response[len(sent):] if response.startswith(sent) else response
            sent = response


def _accepts(method: Any, name: str, via: Any = None) -> bool:
    """Whether ``method`` takes keyword ``name``: by name, or through ``**kwargs`` that it hands to ``via``.

    InternLM2's real ``stream_chat(tokenizer, query, history, max_new_tokens, do_sample, temperature, top_p,
    **kwargs)`` has no ``meta_instruction`` of its own; it passes ``**kwargs`` to ``chat()``, which has one.
    Checking the name alone dropped the system prompt (the answer rules) on that path.
    """
    params = inspect.signature(method).parameters
    if name in params:
        return True
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return takes_any and via is not None and via is not method and name in inspect.signature(via).parameters


_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def cuts_cache(model: Any) -> bool:
    """Whether ``model``'s cache can be cut back to a prefix: transformers' own stateless architectures.

    Remote code (InternLM's own) and stateful models keep other caches, which are not tested here.
    """
    native = type(model).__module__.startswith("transformers.models.")
    return native and not getattr(model, "_is_stateful", False)


def drafts_from_prompt(model: Any) -> bool:
    """Whether generate may draft tokens from the prompt for ``model``: transformers' own architectures only.

    An answer quotes its sources, so the next few tokens are often the ones that
    followed the answer's last words in the prompt; checking such a draft costs one
    step of 4 rows, and a correct one writes 4 tokens (README "Answers"). Drafting
    needs a cache that can be cut back, which stateful models lack and which remote
    code (InternLM's own) is not tested with here, so those decode a token at a time.
    """
    return cuts_cache(model)


def turn_end_ids(tokenizer: Any, model: Any) -> list[int] | None:
    """The model's eos ids plus the chat template's end-of-turn token.

    Some chat checkpoints (InternLM2's among them, depending on revision) list
    only ``</s>`` as eos although the template ends a turn with ``<|im_end|>``;
    without it generation would run on to max_tokens.
    """
    configured = model.generation_config.eos_token_id
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    template = tokenizer.chat_template or ""
    for token in _TURN_END_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token) if token in template else None
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids or None


def _cancel_criterion(event: threading.Event) -> Any:
    """A StoppingCriteria that ends generation once the reader has gone away."""
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return Cancelled()


def _generate_into(model: Any, gen_kwargs: dict[str, Any], streamer: Any, errors: list[BaseException]) -> None:
    """Thread body: run generate; on failure record the error and end the stream,
    so the reader isn't left waiting forever."""
    import torch

    try:
        with torch.inference_mode():
            model.generate(**gen_kwargs)
    except BaseException as exc:  # noqa: BLE001 - re-raised in the reading thread
        errors.append(exc)
        streamer.end()


def split_for_internlm(messages: list[BaseMessage]) -> tuple[str, list[tuple[str, str]], str]:
    """(system prompt, [(user, assistant), ...], final user query) for InternLM's ``chat`` API."""
    system = "\n".join(m.text for m in messages if isinstance(m, SystemMessage))
    turns = [m for m in messages if not isinstance(m, SystemMessage)]
    if not turns or _role(turns[-1]) != "user":
        raise LLMError("the last message must be the user's question")
    history: list[tuple[str, str]] = []
    pending_user: str | None = None
    for m in turns[:-1]:
        if _role(m) == "user":
            pending_user = m.text if pending_user is None else pending_user + "\n" + m.text
        else:
            history.append((pending_user or "", m.text))
            pending_user = None
    query = turns[-1].text if pending_user is None else pending_user + "\n" + turns[-1].text
    return system, history, query


def _model_dir(settings: Settings) -> Path:
    if not settings.llm_path:
        raise LLMError(
            "KB_LLM=transformers needs KB_LLM_PATH, a local model folder such as internlm2-chat-1_8b "
            "(nothing is downloaded)"
        )
    path = Path(settings.llm_path).expanduser()
    if not path.is_dir():
        raise LLMError(f"KB_LLM_PATH={settings.llm_path}: no such folder")
    if not (path / "config.json").is_file():
        raise LLMError(f"KB_LLM_PATH={settings.llm_path} is not a transformers model folder (no config.json)")
    return path


def _chat_mode(tokenizer: Any, model: Any, path: Path) -> str:
    """Pick how prompts are built; fail now, not at the first question, if there is no way."""
    if getattr(tokenizer, "chat_template", None):
        return "template"
    for name in ("stream_chat", "chat"):
        if callable(getattr(model, name, None)):
            return name
    raise LLMError(
        f"{path} has no chat template (tokenizer_config.json / chat_template.jinja) and its model "
        "has no chat()/stream_chat() method, so there is no way to build a chat prompt; "
        "use a chat checkpoint or add a chat_template"
    )


def _build_transformers(settings: Settings) -> ChatTransformers:
    return _load_transformers(_model_dir(settings), settings)


def _load_transformers(path: Path, settings: Settings) -> ChatTransformers:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    # bf16 on a GPU, and on a CPU with AMX or AVX512-BF16, where oneDNN multiplies it 3-9x faster than float32 (README "Answers")
    dtype = torch.bfloat16 if cuda or cpu_multiplies_bf16() else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, local_files_only=True, dtype=dtype,
        )
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise LLMError(f"transformers cannot load {path}: {exc}") from exc
    model = model.to("cuda" if cuda else "cpu").eval()
    if not cuda and dtype == torch.bfloat16 and decode_weights.available(path):
        decode_weights.attach(model, path)  # the GGUF's 4-bit blocks for one token at a time: twice as fast
    return ChatTransformers(
        model=model,
        tokenizer=tokenizer,
        model_path=str(path),
        mode=_chat_mode(tokenizer, model, path),
        max_tokens=settings.llm_max_tokens,
        temperature=settings.llm_temperature,
        prompt_lookup=settings.llm_prompt_lookup,
    )


def auto_runtime(settings: Settings) -> str:
    """What ``KB_LLM=auto`` runs the GGUF model with here: ``transformers`` where the CPU multiplies bf16, else ``llamacpp``."""
    return "transformers" if cpu_multiplies_bf16() else "llamacpp"


def _build_auto(settings: Settings) -> BaseChatModel:
    """The GGUF model where it answers soonest: its bf16 checkpoint on a CPU that multiplies bf16 (AMX, AVX512-BF16), else llama.cpp."""
    if auto_runtime(settings) == "llamacpp":
        return _build_llamacpp(settings)
    gguf = resolve_gguf(settings)
    try:
        folder = ensure_checkpoint(gguf)
    except GGUFError as exc:
        raise LLMError(f"{exc}; set KB_LLM=llamacpp to run the GGUF file itself") from exc
    return _load_transformers(folder, settings)


# --------------------------------------------------------------------------- OpenAI-compatible


def _openai_class() -> type:
    """ChatOpenAI that also sends ``max_tokens``.

    langchain-openai renames max_tokens to ``max_completion_tokens``, which
    llama.cpp's server and older LMDeploy ignore (they would then generate up to
    the context size); sending both keeps the limit everywhere.
    """
    import httpx
    import openai
    from langchain_openai import ChatOpenAI

    class ChatOpenAICompatible(ChatOpenAI):
        def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any) -> dict:
            payload = super()._get_request_payload(input_, stop=stop, **kwargs)
            if payload.get("max_completion_tokens") is not None:
                payload["max_tokens"] = payload["max_completion_tokens"]
            return payload

        # A server that is down, goes away mid-answer or refuses the model name is a person's to fix: one LLMError
        # (the CLI's one line, the chat's error box), not the client library's traceback (an operator review).
        def _stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from super()._stream(*args, **kwargs)
            except (openai.OpenAIError, httpx.TransportError) as exc:  # httpx's own: the stream cut mid-answer
                raise server_failure(self.openai_api_base, self.model_name, exc, self.request_timeout) from exc

        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super()._generate(*args, **kwargs)
            except (openai.OpenAIError, httpx.TransportError) as exc:
                raise server_failure(self.openai_api_base, self.model_name, exc, self.request_timeout) from exc

    return ChatOpenAICompatible


def server_failure(base_url: str | None, model: str, exc: Exception, timeout: Any = None) -> LLMError:
    """What went wrong with the model server, in words: silent too long, unreachable or gone, or what it answered."""
    import httpx
    import openai

    base_url = redact(base_url or "")
    if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException)):
        seconds = timeout.read if isinstance(timeout, httpx.Timeout) else timeout
        within = f"within {seconds:g} s (KB_OPENAI_TIMEOUT)" if isinstance(seconds, (int, float)) else "in time"
        return LLMError(f"the model server at {base_url} did not answer {within}: it is running but stuck or busy")
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):  # refused, reset, cut
        return LLMError(f"the model server at {base_url} did not answer or went away ({type(exc).__name__}: "
                        f"{exc}); is it running?")
    if isinstance(exc, openai.APIStatusError):
        detail = " ".join(str(exc).split())[:300]
        return LLMError(f"the model server at {base_url} refused the request for model {model!r} "
                        f"(HTTP {exc.status_code}: {detail})")
    return LLMError(f"the model server at {base_url} failed: {exc}")


def openai_base_url(settings: Settings) -> str:
    """The server's API root; a bare ``http://host:port`` gets ``/v1`` as LMDeploy and vLLM serve."""
    base = settings.openai_base_url.strip().rstrip("/")
    if not base:
        raise LLMError(
            "KB_LLM=openai needs KB_OPENAI_BASE_URL, e.g. http://127.0.0.1:23333/v1 "
            "(lmdeploy serve api_server) or http://127.0.0.1:8000/v1 (vLLM)"
        )
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LLMError(f"KB_OPENAI_BASE_URL={settings.openai_base_url!r} is not an http(s) URL")
    return base if parts.path not in ("", "/") else base + "/v1"


def first_server_model(base_url: str, api_key: str, timeout: float = 10.0) -> str:
    """Ask the server which model it serves (GET {base_url}/models) and take the first."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
    try:
        models = [m.id for m in client.models.list()]
    except openai.OpenAIError as exc:
        raise LLMError(f"cannot list models at {base_url}/models ({exc}); is the server running? "
                       "Or set KB_OPENAI_MODEL") from exc
    if not models:
        raise LLMError(f"{base_url}/models lists no model; set KB_OPENAI_MODEL")
    return models[0]


def _build_openai(settings: Settings) -> BaseChatModel:
    base = openai_base_url(settings)
    api_key = settings.openai_api_key or "EMPTY"
    model = settings.openai_model or first_server_model(base, api_key)
    return _openai_class()(
        base_url=base,
        model=model,
        api_key=api_key,
        streaming=True,
        max_tokens=settings.llm_max_tokens,
        temperature=settings.llm_temperature,
        max_retries=1,
        # openai's default waits 600 s for each silence, and retried: a stuck server held a chat for 20 minutes (a
        # number, not an httpx.Timeout: langchain-openai caches its clients by it, and that one is not hashable)
        timeout=settings.openai_timeout,
    )


# --------------------------------------------------------------------------- public API

_BUILDERS = {"auto": _build_auto, "llamacpp": _build_llamacpp, "transformers": _build_transformers,
             "openai": _build_openai}


def _backend(settings: Settings) -> str:
    name = settings.llm.strip().lower()
    if name not in _BUILDERS:
        raise LLMError(f"KB_LLM={settings.llm!r} is not a known LLM backend; use one of: {', '.join(BACKENDS)}")
    return name


def build_chat_model(settings: Settings) -> BaseChatModel:
    """Load the configured chat model (slow: cache the result).

    Raises LLMError with a human-readable message for bad configuration.
    """
    return _BUILDERS[_backend(settings)](settings)


def describe_llm(settings: Settings) -> str:
    """A short label for the UI and the CLI, computed without loading anything."""
    name = settings.llm.strip().lower()
    gguf = Path(settings.llm_gguf).name if settings.llm_gguf else GGUF_NAME
    if name == "auto":
        runtime = "transformers, bf16, 4-bit decode" if auto_runtime(settings) == "transformers" else "llamacpp"
        return f"auto: {gguf} ({runtime})"
    if name == "llamacpp":
        return f"llamacpp: {gguf}"
    if name == "transformers":
        return f"transformers: {Path(settings.llm_path).name if settings.llm_path else '(KB_LLM_PATH not set)'}"
    if name == "openai":
        model = settings.openai_model or "first served model"
        # shown to every chat user: credentials a URL may carry are hidden (a security review)
        where = redact(settings.openai_base_url)
        return f"openai: {model} @ {where or '(KB_OPENAI_BASE_URL not set)'}"
    return f"unknown LLM backend {settings.llm!r}"


def _unbound(model: Runnable) -> Runnable:
    """The chat model inside ``.bind(...)`` wrappers: its state is the model's, not the wrapper's."""
    while not isinstance(model, BaseChatModel) and hasattr(model, "bound"):
        model = model.bound  # type: ignore[attr-defined]
    return model


def token_counter(model: Runnable) -> Callable[[str], int] | None:
    """The model's own token count, where its tokenizer runs in this process; None for a remote model.

    The answer's context is budgeted in tokens because the first word waits
    for every one of them; a remote server's tokenizer isn't at hand (and
    ``ChatOpenAI.get_num_tokens`` would download tiktoken's tables), so those
    budgets stay estimates.
    """
    model = _unbound(model)
    return model.get_num_tokens if isinstance(model, (ChatLlamaCpp, ChatTransformers)) else None


def prime_chat_model(model: Runnable, messages: list[BaseMessage]) -> bool:
    """Read a prompt's fixed beginning before anyone asks; True when the model had something to gain.

    llama.cpp and a transformers model (``core.prompt_cache``) reuse the longest
    common prefix of the tokens they have read, so a server that reads its answer
    rules once at start-up spares its first question those seconds, as every
    later question is spared them. A transformers model's first long prompt on a
    CPU also pays ~3 s for oneDNN to build its kernels, which this pays instead.
    Remote models are left alone.
    """
    model = _unbound(model)
    if not isinstance(model, (ChatLlamaCpp, ChatTransformers)):
        return False
    model.invoke(messages, max_tokens=1)
    return True


def reset_chat_model(model: Runnable) -> None:
    """Clear per-conversation state between independent questions.

    Only the in-process models keep any (llama.cpp its evaluated tokens, a transformers
    model its prompt caches); for the others this does nothing. Accepts a model
    wrapped by ``.bind(...)`` too.
    """
    model = _unbound(model)
    if isinstance(model, (ChatLlamaCpp, ChatTransformers)):
        model.reset()
