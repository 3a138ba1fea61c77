"""Small assertions shared by the AppTest modules (not fixtures: plain functions to import)."""

from __future__ import annotations


def ok(at):
    """No exception box anywhere on the page."""
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def finish_jobs(at):
    """Syncs, uploads, re-chunks and evaluations run as background jobs (kb/jobs.py): let them end, then rerun as
    the jobs panel does."""
    from pages import _resources as resources

    assert resources.job_queue().wait_idle(300)
    return at.run()


def frame_with(at, column: str):
    """The first dataframe on the page that has ``column``."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no dataframe with a {column!r} column: {[list(d.value.columns) for d in at.dataframe]}")
