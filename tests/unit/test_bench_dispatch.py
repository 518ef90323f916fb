"""``bench.dispatch``: the phase arithmetic of one request from driver stamps and rank times (unit tier)."""

from __future__ import annotations

import pytest

from xdit_multigpu.bench.dispatch import PHASES, phases, summary, table

pytestmark = pytest.mark.unit


def _stamps(t0: float) -> list[tuple[str, float, float, object]]:
    ms = 0.001
    return [("pack", t0 + 1 * ms, t0 + 2 * ms, None), ("put", t0 + 2 * ms, t0 + 5 * ms, None),
            ("gather", t0 + 6 * ms, t0 + 120 * ms, None), ("drain", t0 + 50 * ms, t0 + 51 * ms, None),
            ("snapshot", t0 + 56 * ms, t0 + 58 * ms, None), ("result", t0 + 115 * ms, t0 + 117 * ms, 1),
            ("result", t0 + 118 * ms, t0 + 119 * ms, 0)]


def test_phases_add_up_to_the_wall_time_and_dispatch_excludes_rank_0s_sample():
    t0 = 1000.0
    ranks = [{"t_in": t0 + 0.010, "t_out": t0 + 0.110}, {"t_in": t0 + 0.009, "t_out": t0 + 0.109}]
    row = phases(t0, t0 + 0.121, _stamps(t0), ranks)
    assert row["before call"] == pytest.approx(1.0) and row["pack"] == pytest.approx(1.0)
    assert row["ray.put"] == pytest.approx(3.0) and row["submit"] == pytest.approx(1.0)
    assert row["to rank 0"] == pytest.approx(4.0) and row["rank 0 sample"] == pytest.approx(100.0)
    assert row["rank 0 back"] == pytest.approx(9.0) and row["other ranks"] == pytest.approx(1.0)
    assert row["after call"] == pytest.approx(1.0) and row["rank start skew"] == pytest.approx(1.0)
    assert row["drains (count)"] == 1 and row["snapshot"] == pytest.approx(2.0)
    in_order = [name for name, _ in PHASES[:9]]
    assert sum(row[k] for k in in_order) == pytest.approx(row["wall"])
    assert row["dispatch"] == pytest.approx(row["wall"] - 100.0)


def test_one_rank_has_no_ray_put_and_the_table_lists_every_phase():
    t0 = 5.0
    marks = [s for s in _stamps(t0) if s[0] != "put" and not (s[0] == "result" and s[3] == 1)]
    row = phases(t0, t0 + 0.121, marks, [{"t_in": t0 + 0.010, "t_out": t0 + 0.110}])
    assert row["ray.put"] == 0.0 and row["submit"] == pytest.approx(4.0)
    text = table({"fresh": summary([row, row]), "reuse": summary([row])})
    assert "fresh" in text and "reuse" in text
    assert all(name in text for name, _ in PHASES)
