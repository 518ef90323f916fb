"""``python -m xdit_multigpu.bench.dispatch`` end to end on 2 CPU ranks (the default ``cpu:2``, tiny Flux):
both request kinds are timed through the real engine pool, every phase row adds up, the Ray floor is
measured, and a ``reuse`` request is still packed and put into the object store once for both ranks."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

pytest.importorskip("ray")

REQUESTS = 2


@pytest.fixture(scope="module")
def report(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON one ``main`` run writes (2 timed requests of each kind after 1 warm-up, 1 step each)."""
    from xdit_multigpu.bench.dispatch import main

    tmp = tmp_path_factory.mktemp("dispatch")
    out = tmp / "d.json"
    assert main(["--requests", str(REQUESTS), "--warmup", "1", "--steps", "1", "--json", str(out),
                 "--model-dir", str(tmp)]) == 0
    return json.loads(out.read_text())


def _row_keys() -> set[str]:
    """What ``phases`` puts in every row: the named phases plus the drain time, the wall and dispatch."""
    from xdit_multigpu.bench.dispatch import PHASES

    return {name for name, _ in PHASES} | {"drains (ms)", "wall", "dispatch"}


def test_both_kinds_have_one_complete_row_per_timed_request(report: dict[str, Any]):
    assert set(report) >= {"args", "rows", "summary", "ray_floor", "ray_env"}
    assert report["args"]["devices"] == "cpu:2" and report["args"]["requests"] == REQUESTS
    assert set(report["rows"]) == set(report["summary"]) == {"fresh", "reuse"}
    for kind, rows in report["rows"].items():
        assert len(rows) == REQUESTS, kind
        for row in rows:
            assert set(row) == _row_keys(), (kind, sorted(row))
            assert all(v >= 0 for v in row.values()), (kind, row)
            assert row["dispatch"] == pytest.approx(row["wall"] - row["rank 0 sample"], abs=0.01), (kind, row)
            assert row["rank 0 sample"] > 0 and row["wall"] > row["rank 0 sample"], (kind, row)


def test_reuse_requests_are_packed_and_put_once_for_both_ranks(report: dict[str, Any]):
    """A re-run with cached conditioning still packs (held tensors compared, sent as keys) and, with two
    ranks, puts the request into the object store (one rank would skip ``ray.put``: a 0.0 phase)."""
    for row in report["rows"]["reuse"]:
        assert row["pack"] > 0 and row["ray.put"] > 0 and row["snapshot"] >= 0, row


def test_the_ray_floor_is_measured(report: dict[str, Any]):
    """Median > 0; the quartiles only bracket it (``statistics.quantiles`` extrapolates from 2 samples)."""
    median, p25, p75 = report["ray_floor"]["ping all ranks"]
    assert median > 0 and p25 <= median <= p75
