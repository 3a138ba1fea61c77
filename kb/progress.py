"""A progress callback shared by the CLI (tqdm) and the pages (st.progress).

Long steps (clone, load, embed, store) report through one plain callable so
that kb/ never needs to know who is watching.
"""

from __future__ import annotations

from typing import Protocol

from git import RemoteProgress


# What each stage is called where a person watches it (the pages' bars and the jobs panel; the CLI's bars keep
# the short names): one table, as the two pages' own had drifted ("Embedding chunks" and "Embedding").
STAGE_LABELS = {
    "clone": "Cloning", "fetch": "Fetching", "load": "Loading files", "embed": "Embedding chunks",
    "store": "Storing vectors", "rechunk": "Re-chunking sources", "evaluate": "Scoring questions",
    "answer": "Questions answered", "export chunks": "Reading chunks", "export passages": "Reading passages",
    "export clones": "Packing the clones", "pack": "Packing the archive",
    "waiting": "Waiting for another writer",
}


class Progress(Protocol):
    def __call__(self, stage: str, done: float, total: float | None = None, message: str = "") -> None:
        """Report that ``stage`` has reached ``done`` of ``total`` (None: unknown)."""


def no_progress(stage: str, done: float, total: float | None = None, message: str = "") -> None:
    """The default: report nothing."""


class GitProgress(RemoteProgress):
    """Forwards GitPython's clone/fetch progress to a :class:`Progress`."""

    _OPS = {
        RemoteProgress.COUNTING: "counting objects",
        RemoteProgress.COMPRESSING: "compressing objects",
        RemoteProgress.RECEIVING: "receiving objects",
        RemoteProgress.RESOLVING: "resolving deltas",
        RemoteProgress.WRITING: "writing objects",
        RemoteProgress.FINDING_SOURCES: "finding sources",
        RemoteProgress.CHECKING_OUT: "checking out",
    }

    def __init__(self, progress: Progress, stage: str = "clone") -> None:
        super().__init__()
        self._progress = progress
        self._stage = stage

    def update(self, op_code: int, cur_count, max_count=None, message: str = "") -> None:  # type: ignore[override]
        op = self._OPS.get(op_code & RemoteProgress.OP_MASK, "git")
        total = float(max_count) if max_count else None
        self._progress(self._stage, float(cur_count or 0), total, op + (f" {message}" if message else ""))


class TqdmProgress:
    """CLI progress: one tqdm bar per stage, on stderr so --json stays clean."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._bars: dict[str, object] = {}

    def __call__(self, stage: str, done: float, total: float | None = None, message: str = "") -> None:
        if not self._enabled:
            return
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            # initial: work reported done at once (vectors reused, a resumed stage) took no time, and counted in
            # the rate it made the ETA of the slow rest far too short
            bar = tqdm(total=total, initial=done, desc=stage, unit="", leave=True, dynamic_ncols=True)
            self._bars[stage] = bar
        elif done < bar.n:  # type: ignore[attr-defined]
            bar.reset(total=total)  # type: ignore[attr-defined]  # the stage again (chunks, then passages): a new rate
            bar.initial = done  # type: ignore[attr-defined]
        if total is not None and bar.total != total:  # type: ignore[attr-defined]
            bar.total = total  # type: ignore[attr-defined]
        bar.n = done  # type: ignore[attr-defined]
        if message:
            bar.set_postfix_str(message[:60], refresh=False)  # type: ignore[attr-defined]
        bar.refresh()  # type: ignore[attr-defined]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()  # type: ignore[attr-defined]
        self._bars.clear()
