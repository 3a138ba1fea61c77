"""The keys and values a transformers model computed for its last prompts, reused for the next one's prefix.

llama.cpp keeps the tokens it has read and reads only what follows the longest
common prefix of the next prompt. The answer prompt starts with the same rules
for every question (183 tokens), so without this the transformers path read
them again each time: 1.2 s of a 9.7 s first token on a two-core CPU without
AMX (README "The runtime"). transformers' ``generate`` takes a filled
``DynamicCache`` as ``cache`` and reads only the tokens past its length; this keeps a few
such caches (the answer prompt's and the follow-up rewrite's differ) and hands
out a copy of the longest prefix one of them shares with the next prompt.

A cache is kept only for the prompt (the tokens generated after it are cut off)
and only after ``generate`` ended normally: one interrupted by an error may hold
a layer longer than the others, and is dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

KEEP = 4  # caches kept: ~28 KB a token for the packaged 1.5B model, so four 1,100-token prompts hold ~125 MB
MIN_SHARED = 16  # fewer shared tokens than this (a chat template's opening) are read again rather than copied


@dataclass
class _Entry:
    ids: Any  # 1-D LongTensor, the prompt tokens whose keys and values ``cache`` holds
    cache: Any  # transformers DynamicCache, never changed once kept


def common_prefix(a: Any, b: Any) -> int:
    """How many leading tokens two 1-D id tensors share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def _croppable(cache: Any) -> bool:
    """Only full-attention dynamic layers keep every position, so only they can be cut back to a prefix."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _prefix_copy(cache: Any, length: int) -> Any:
    """A new cache holding the first ``length`` positions of ``cache`` (a copy: ``generate`` extends it)."""
    from transformers import DynamicCache

    copy = DynamicCache()
    for index, layer in enumerate(cache.layers):
        copy.update(layer.keys[..., :length, :].clone(), layer.values[..., :length, :].clone(), index)
    return copy


class PromptCache:
    """A few prompt caches of one model: ``take`` a copy of the best prefix for a prompt, ``give_back`` it read.

    A kept cache is copied, never cut back in place: a follow-up's rewrite prompt
    shares only the chat template's first tokens with an answer prompt, and cutting
    the answer prompt's cache down to them would lose its rules for the next answer.
    """

    def __init__(self, keep: int = KEEP, min_shared: int = MIN_SHARED) -> None:
        self._keep = keep
        self._min_shared = min_shared
        self._entries: list[_Entry] = []  # most recently used last
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, ids: Any) -> tuple[Any | None, int]:
        """A copy of the longest prefix of ``ids`` (1-D) that a kept cache holds, and its length.

        At least one token is always left to read (``generate`` needs one to start
        from); a prompt sharing fewer than ``min_shared`` tokens gets ``(None, 0)``,
        and the caller starts a new cache.
        """
        with self._lock:
            scored = [(common_prefix(entry.ids, ids), i) for i, entry in enumerate(self._entries)]
            best, index = max(scored, default=(0, -1))
            length = min(best, len(ids) - 1)
            if length < max(self._min_shared, 1):
                return None, 0
            entry = self._entries.pop(index)
            self._entries.append(entry)  # the most recently used goes last
            return _prefix_copy(entry.cache, length), length

    def give_back(self, ids: Any, cache: Any) -> None:
        """Keep ``cache`` for the prompt ``ids``, without the tokens generated after it."""
        if cache is None or not _croppable(cache) or cache.get_seq_length() < len(ids):
            return  # nothing to reuse, a layer kind that can't be cut back, or a prompt not read in full
        extra = cache.get_seq_length() - len(ids)
        if extra:
            cache.crop(-extra)
        with self._lock:  # a kept prompt that this one starts with holds nothing more
            self._entries = [e for e in self._entries if common_prefix(e.ids, ids) < len(e.ids)]
            self._entries.append(_Entry(ids.clone(), cache))
            del self._entries[: -self._keep]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def feed_only_uncached(model: Any) -> None:
    """Make ``generate``'s drafting path read only the prompt tokens its cache lacks, as its plain path does.

    With ``prompt_lookup_num_tokens`` (the product's default), transformers 5.24's
    assisted decoding feeds the whole prompt in its first step whatever the cache
    holds: the cached prefix is read again and appended after itself, so every
    later position is wrong. Its plain path (``_prefill``) slices the prompt to
    what the cache lacks; this does the same for the first drafting step, on this
    model only. It changes nothing when the cache is empty or already sliced.
    """
    if getattr(model, "_kb_feeds_only_uncached", False):
        return
    original = model.prepare_inputs_for_generation

    def prepare(input_ids: Any, next_sequence_length: int | None = None, cache: Any = None,
                is_first_iteration: bool | None = False, **kwargs: Any) -> Any:
        if is_first_iteration and next_sequence_length is None and cache is not None:
            past = cache.get_seq_length()
            if 0 < past < input_ids.shape[1]:
                next_sequence_length = input_ids.shape[1] - past
        return original(input_ids, next_sequence_length=next_sequence_length, cache=cache,
                        is_first_iteration=is_first_iteration, **kwargs)

    model.prepare_inputs_for_generation = prepare
    model._kb_feeds_only_uncached = True
