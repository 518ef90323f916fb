"""Benchmark summary, targets, schema and report rendering on a hand-made ``bench.json`` (no processes)."""

from __future__ import annotations

import pytest

from xdit_multigpu.bench.plots import svg_chart
from xdit_multigpu.bench.report import render
from xdit_multigpu.bench.schema import problems
from xdit_multigpu.bench.summary import summarize
from xdit_multigpu.bench.targets import check_targets

pytestmark = pytest.mark.unit


def _row(ms, plan, peaks):
    return {"plan": plan, "per_step_ms": ms, "step_ms": [ms], "per_step_ms_ranks": [ms] * len(peaks), "timed_wall_s": 1.0,
            "dispatch_ms": [12.0, 14.0], "peak_allocated_gb": peaks, "peak_reserved_gb": peaks,
            "vs_stock": {"rel_l2": 0.006}}


def _report():
    return {
        "schema": "xdit-bench/1", "environment": {"date_utc": "d", "python": "3", "torch": "2"}, "options": {},
        "side_by_side": {}, "total_s": 1.0,
        "models": {"flux-dev": {"sizes": [1024], "stock": {"sizes": {"1024": {
            "per_step_ms": 170.0, "step_ms": [170.0], "timed_wall_s": 1.0, "peak_allocated_gb": 23.0,
            "e2e_sampling_s": 5.0, "vae_decode_s": 0.5}}},
            "engine": {"1": {"pool_start_s": 30.0, "rows": {"Hybrid/1024": _row(172.0, "cfg 1 x ulysses 1 x ring 1", [23.0])}},
                       "4": {"pool_start_s": 38.0, "rows": {"Hybrid/1024": _row(50.0, "cfg 1 x ulysses 4 x ring 1",
                                                                              [24.0, 24.0, 24.0, 24.0])}}}}},
    }


def test_summary_ratios_are_within_the_run():
    rows = {(r["gpus"], r["strategy"]): r for r in summarize(_report())}
    four = rows[(4, "Hybrid")]
    assert four["speedup_vs_ours_1"] == pytest.approx(172 / 50, abs=1e-3)
    assert four["speedup_vs_stock"] == pytest.approx(170 / 50, abs=1e-3)
    assert four["e2e_s"] is None or four["e2e_s"] > 0
    assert rows[(1, "stock ComfyUI")]["e2e_s"] == pytest.approx(5.5)


def test_targets_say_met_or_by_how_much():
    rep = _report()
    rep["summary"] = summarize(rep)
    status = {t["target"]: t["status"] for t in check_targets(rep, rep["summary"])}
    assert status["flux-dev 1024² on 4 GPUs >= 3.4x"] == "met"
    assert status["flux-dev 1024²: our 1 GPU within 2 % of stock"] == "met"  # 172 vs 170: +1.2 %
    assert status["flux-dev 1024² 4 GPUs: peak/GPU <= 1-GPU peak"] == "missed"  # 24 > 23 GB
    rep["models"]["flux-dev"]["engine"]["4"]["rows"]["Hybrid (graphs off)/1024"] = _row(
        60.0, "cfg 1 x ulysses 4 x ring 1", [24.0] * 4)
    targets = [t["target"] for t in check_targets(rep, summarize(rep))]
    assert targets.count("flux-dev 1024² 4 GPUs: peak/GPU <= 1-GPU peak") == 1  # not again for the A/B twin
    assert status["pool start <= 20 s (flux-dev, 4 GPUs)"] == "missed"


def test_schema_and_render():
    rep = _report()
    rep["summary"] = summarize(rep)
    assert problems(rep) == []
    broken = _report()
    del broken["models"]["flux-dev"]["engine"]["4"]["rows"]["Hybrid/1024"]["per_step_ms"]
    broken["summary"] = []
    assert any("per_step_ms: missing" in p for p in problems(broken))
    md = render(rep, {"flux-dev": "img/speedup_flux-dev.svg"})
    assert "| flux-dev | 1024² | 4 | Hybrid: cfg 1 x ulysses 4 x ring 1 | 50.0 | 3.44x | 3.40x |" in md
    assert "![speedup flux-dev](img/speedup_flux-dev.svg)" in md
    assert svg_chart("m", {1024: [(1, 1.0), (4, 3.4)]}).count("<circle") == 2


def test_merge_split_runs():
    from xdit_multigpu.bench.report import merge

    first = _report()
    first["side_by_side"] = {"skipped": "--no-side-by-side"}
    side = {"schema": "xdit-bench/1", "models": {}, "total_s": 2.0, "side_by_side": {"diffusers_cp": {"rows": [
        {"mode": "ulysses", "gpus": 4, "size": 1024, "per_step_ms": 60.0}]}}}
    merged = merge([first, side])
    assert merged["side_by_side"]["diffusers_cp"]["rows"][0]["mode"] == "ulysses"
    assert "flux-dev" in merged["models"] and merged["total_s"] == 3.0
    md = render(merged, {})
    assert "| ulysses | 4 | 1024² | 60.0 |" in md and "| 50.0 |" in md  # ours on the same GPUs beside it


def test_merge_header_names_every_files_models():
    from xdit_multigpu.bench.report import merge

    first, second = _report(), _report()
    first["options"] = {"models": ["flux-dev"], "sizes": [1024]}
    second["options"] = {"models": ["sd35-large", "flux-dev"], "sizes": [2048]}
    merged = merge([first, second])
    assert merged["options"] == {"models": ["flux-dev", "sd35-large"], "sizes": [1024]}
    assert first["options"]["models"] == ["flux-dev"]  # the inputs are left as they were
    assert "models ['flux-dev', 'sd35-large']" in render(merged, {})


def test_text_encode_joins_the_28_step_image_and_the_note_says_so():
    rep = _report()
    rep["summary"] = summarize(rep)
    assert "text encoding is replaced by fixed conditioning" in render(rep, {})  # older JSON: no encode time
    rep = _report()
    rep["models"]["flux-dev"]["stock"]["sizes"]["1024"]["text_encode_s"] = 0.25
    rep["models"]["flux-dev"]["engine"]["1"]["rows"]["Hybrid/1024"]["e2e_sampling_s"] = 4.0
    rows = {(r["gpus"], r["strategy"]): r for r in summarize(rep)}
    assert rows[(1, "stock ComfyUI")]["e2e_s"] == pytest.approx(0.25 + 5.0 + 0.5)  # encode + sampling + decode
    assert rows[(1, "Hybrid")]["e2e_s"] == pytest.approx(0.25 + 4.0 + 0.5)  # the same encode on both sides
    rep["summary"] = list(rows.values())
    text = render(rep, {})
    assert "CLIPTextEncode" in text and "flux-dev 250 ms" in text


def test_write_plots_writes_a_png_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    from PIL import Image

    from xdit_multigpu.bench.plots import write_plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rep = _report()
    paths = write_plots(summarize(rep), str(tmp_path / "img"), str(tmp_path))
    assert paths == {"flux-dev": "img/speedup_flux-dev.png"}
    with Image.open(tmp_path / paths["flux-dev"]) as img:
        assert img.format == "PNG" and img.size[0] > 400
        colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert (0x1F, 0x77, 0xB4) in colours  # the first size's line was drawn
    assert (tmp_path / "img" / "speedup_flux-dev.svg").is_file()


def test_dispatch_is_the_steady_state_of_repeated_requests_when_the_row_has_them():
    rep = _report()
    row4 = rep["models"]["flux-dev"]["engine"]["4"]["rows"]["Hybrid/1024"]
    rows = {(r["gpus"], r["strategy"]): r for r in summarize(rep)}
    assert rows[(4, "Hybrid")]["dispatch_ms"] == 14.0  # older JSON: the median of the row's requests
    row4["dispatch_ms"] = [35.0, 22.0]  # warm-up (the pool's first request) and timed
    row4["dispatch_repeat_ms"] = [18.0, 17.0, 19.0]
    rows = {(r["gpus"], r["strategy"]): r for r in summarize(rep)}
    assert rows[(4, "Hybrid")]["dispatch_ms"] == 18.0 and rows[(4, "Hybrid")]["dispatch_first_ms"] == 35.0
    rep["summary"] = list(rows.values())
    assert problems(rep) == []
    assert "| 18.0 | 35.0 |" in render(rep, {})


@pytest.mark.parametrize(("gpus", "largest"), [(1, 0), (2, 2), (3, 2), (4, 4), (7, 4), (8, 8), (16, 8)])
def test_groups_bench_takes_the_largest_layout_set_the_machine_has(gpus, largest):
    from xdit_multigpu.bench.groups import GPU_LAYOUTS, _largest_layout

    assert _largest_layout(gpus) == largest
    for n, layouts in GPU_LAYOUTS.items():  # every layout uses exactly the first n GPUs
        for text in layouts:
            assert sorted(int(i) for i in text.replace("|", ",").split(",")) == list(range(n))


def test_warm_start_ab_table_compares_the_28_step_image_and_setup():
    rep = _report()
    rows = rep["models"]["flux-dev"]["engine"]["4"]["rows"]
    rows["Hybrid/1024"].update(e2e_sampling_s=2.0, setup_ms=10.0,
                               graphs={"replayed": 5, "captured": 1, "eager": 0, "warm_starts": 1})
    rows["Hybrid (warm start off)/1024"] = dict(_row(50.5, "cfg 1 x ulysses 4 x ring 1", [24.0] * 4),
                                                e2e_sampling_s=2.15, setup_ms=160.0)
    md = render(rep, {})
    assert "## CUDA graph warm start A/B (same pool, same run)" in md
    # 28-step image = 0.5 s decode + sampling (no text encode in this report)
    assert "| flux-dev | 1024² | 4 | 2.650 | 2.500 | 150 | 160.0 | 10.0 | replayed 5, captured 1, eager 0, warm starts 1 |" in md
    del rows["Hybrid (warm start off)/1024"]
    assert "warm start A/B" not in render(_report(), {})
