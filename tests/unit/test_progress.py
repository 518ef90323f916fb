"""``executor.progress.CallProgress``: rank 0's reports reach the hook exactly once, in order, whether
they come from a drain of the sink or from the log rank 0 returns with its result (unit tier: no Ray)."""

from __future__ import annotations

import pytest

from xdit_multigpu.executor.base import ProgressHook
from xdit_multigpu.executor.progress import CallProgress

pytestmark = pytest.mark.unit


class Hook:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, object]] = []

    def __call__(self, step: int, total: int, preview: object) -> None:
        self.seen.append((step, total, preview))


def _feed(call: int = 7) -> tuple[CallProgress, Hook]:
    hook = Hook()
    return CallProgress(ProgressHook(hook), call), hook


def test_drained_reports_of_other_calls_and_repeats_are_dropped():
    feed, hook = _feed(call=7)
    feed.take([(6, 0, 1, 4, None), (6, 1, 2, 4, None),  # a previous call's undrained tail
               (7, 0, 1, 3, "p1"), (7, 1, 2, 3, None)])
    feed.take([(7, 1, 2, 3, None), (7, 2, 3, 3, None)])  # seq 1 again: already handed over
    assert hook.seen == [(1, 3, "p1"), (2, 3, None), (3, 3, None)]
    assert feed.delivered == 3


def test_finish_hands_over_the_missing_reports_from_the_log_without_a_drain():
    feed, hook = _feed()
    feed.take([(7, 0, 1, 4, None)])
    drains = []
    feed.finish([(1, 4, False), (2, 4, False), (3, 4, False), (4, 4, False)], lambda: drains.append(1) or [])
    assert drains == []  # no missing report carried a preview: no round trip
    assert hook.seen == [(1, 4, None), (2, 4, None), (3, 4, None), (4, 4, None)]


def test_finish_drains_once_for_a_missing_preview_and_keeps_the_order():
    feed, hook = _feed()
    feed.take([(7, 0, 1, 3, None)])
    log = [(1, 3, False), (2, 3, True), (3, 3, False)]
    calls = []

    def drain():
        calls.append(1)
        return [(7, 1, 2, 3, "x0 of step 2")]  # step 3's report has not landed yet: it comes from the log

    feed.finish(log, drain)
    assert calls == [1]
    assert hook.seen == [(1, 3, None), (2, 3, "x0 of step 2"), (3, 3, None)]


def test_finish_after_everything_was_drained_adds_nothing():
    feed, hook = _feed()
    feed.take([(7, 0, 1, 2, None), (7, 1, 2, 2, "last")])
    feed.finish([(1, 2, False), (2, 2, True)], lambda: pytest.fail("nothing is missing: no drain"))
    assert hook.seen == [(1, 2, None), (2, 2, "last")]


def test_a_raising_hook_propagates():
    def boom(step: int, total: int, preview: object) -> None:
        raise KeyboardInterrupt("stop")

    feed = CallProgress(ProgressHook(boom), 1)
    with pytest.raises(KeyboardInterrupt):
        feed.finish([(1, 1, False)], list)
