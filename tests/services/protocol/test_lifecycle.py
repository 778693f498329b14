"""The session and video-job lifecycles: every allowed move, and every other one refused."""

from __future__ import annotations

import itertools

import pytest

from services.jobs.records import VIDEO_TRANSITIONS, VideoRecord, VideoStatus
from services.protocol import SESSION_TRANSITIONS, IllegalTransition, Lifecycle, SessionStatus

S = SessionStatus
# The session lifecycle, written out: opening -> running -> finishing -> ended, and from any
# status that is not final, closed (stopped unsealed) or failed; a running session may be
# suspended (drained, to go on later from its snapshot), and so may a resume still opening
# (its client went away again before it took the session up: its snapshot still stands).
ALLOWED = {
    (S.OPENING, S.RUNNING), (S.OPENING, S.CLOSED), (S.OPENING, S.FAILED),
    (S.OPENING, S.SUSPENDED),
    (S.RUNNING, S.FINISHING), (S.RUNNING, S.CLOSED), (S.RUNNING, S.FAILED),
    (S.RUNNING, S.SUSPENDED),
    (S.FINISHING, S.ENDED), (S.FINISHING, S.CLOSED), (S.FINISHING, S.FAILED),
}  # fmt: skip


@pytest.mark.parametrize(("old", "new"), list(itertools.product(SessionStatus, SessionStatus)))
def test_session_transitions(old, new):
    lifecycle = Lifecycle(old, SESSION_TRANSITIONS, "session s1")
    if (old, new) in ALLOWED:
        lifecycle.to(new)
        assert lifecycle.status == new
    else:
        with pytest.raises(IllegalTransition, match=f"session s1: {old} -> {new} is not allowed"):
            lifecycle.to(new)
        assert lifecycle.status == old


def test_final_statuses_say_so():
    for status in SessionStatus:
        lifecycle = Lifecycle(status, SESSION_TRANSITIONS, "s")
        assert lifecycle.terminal == (status in (S.ENDED, S.CLOSED, S.SUSPENDED, S.FAILED))
    with pytest.raises(IllegalTransition, match=r"from ended: nothing \(final\)"):
        Lifecycle(S.ENDED, SESSION_TRANSITIONS, "s").to(S.RUNNING)


def test_a_table_must_cover_every_status():
    with pytest.raises(ValueError, match="lack statuses"):
        Lifecycle(S.OPENING, {S.OPENING: frozenset({S.RUNNING})}, "s")


def test_video_job_lifecycle():
    record = VideoRecord(
        id="video_1", model="tiny", created_at=0, seconds="1", size="192x128", prompt="p",
        seed=0, mode="histream+", num_frames=21, tenant="default",
    )  # fmt: skip
    assert record.status == VideoStatus.queued
    record.advance(VideoStatus.in_progress)
    record.advance(VideoStatus.completed)
    with pytest.raises(IllegalTransition, match="video video_1: completed -> failed"):
        record.advance(VideoStatus.failed)
    assert record.status == VideoStatus.completed
    assert VIDEO_TRANSITIONS[VideoStatus.queued] == {VideoStatus.in_progress, VideoStatus.failed}
