"""Flat summary rows from ``bench.json``: per model x size x device count x strategy, with the ratios
computed within the run (vs our 1-device pool and vs ComfyUI's stock sampler)."""

from __future__ import annotations

from typing import Any


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, m in report.get("models", {}).items():
        if "skipped" in m:
            rows.append({"model": name, "skipped": m["skipped"]})
            continue
        for size in m.get("sizes", []):
            rows.extend(_size_rows(name, m, size))
    return rows


def _size_rows(name: str, m: dict[str, Any], size: int) -> list[dict[str, Any]]:
    st = _get(m, "stock", "sizes", str(size)) or {}
    stock_ms = st.get("per_step_ms")
    one = _get(m, "engine", "1", "rows", f"Hybrid/{size}") or {}
    ours1 = one.get("per_step_ms")
    vae = st.get("vae_decode_s")
    text = st.get("text_encode_s")  # once per model, the same for every row: it runs in ComfyUI's process
    rows = [{"model": name, "size": size, "gpus": 1, "strategy": "stock ComfyUI", "plan": "ComfyUI sampler, 1 GPU",
             "per_step_ms": stock_ms, "speedup_vs_ours_1": _ratio(ours1, stock_ms), "speedup_vs_stock": 1.0 if stock_ms else None,
             "peak_gb": [st.get("peak_allocated_gb")], "e2e_s": _e2e(st.get("e2e_sampling_s"), vae, text),
             "text_encode_s": text,
             "setup_ms": st.get("setup_ms"),
             "error": _get(m, "stock", "error")}]
    for n, eng in sorted(m.get("engine", {}).items(), key=lambda kv: int(kv[0])):
        if "error" in eng:
            rows.append({"model": name, "size": size, "gpus": int(n), "error": eng["error"]})
            continue
        for key, row in eng.get("rows", {}).items():
            strategy, _, s = key.partition("/")
            if int(s) != size:
                continue
            ms = row.get("per_step_ms")
            rows.append({
                "model": name, "size": size, "gpus": int(n), "strategy": strategy, "plan": row.get("plan"),
                "per_step_ms": ms, "speedup_vs_ours_1": _ratio(ours1, ms), "speedup_vs_stock": _ratio(stock_ms, ms),
                "peak_gb": row.get("peak_allocated_gb"), "e2e_s": _e2e(row.get("e2e_sampling_s"), vae, text),
                "text_encode_s": text,
                # steady state when the row repeated 1-step requests (older JSON: its 2-3 requests)
                "dispatch_ms": _median(row.get("dispatch_repeat_ms") or row.get("dispatch_ms")),
                "dispatch_first_ms": (row.get("dispatch_ms") or [None])[0], "pool_start_s": eng.get("pool_start_s"),
                "setup_ms": row.get("setup_ms"), "attention_paths": _paths(row.get("attention_paths")),
                "rel_l2_vs_stock": _get(row, "vs_stock", "rel_l2"), "error": row.get("error") or row.get("skipped"),
                "nccl_ms_per_step": _get(row, "profile_rank0", "nccl_ms_per_step"),
                "graphs": _graphs(row.get("graphs")),
            })
    return rows


def _graphs(g: dict[str, Any] | None) -> str | None:
    """Rank 0's denoiser calls: "replayed r / eager e" (and why graphs were off, if they were)."""
    if not g:
        return None
    text = f"replayed {g.get('replayed', 0)}, captured {g.get('captured', 0)}, eager {g.get('eager', 0)}"
    if g.get("warm_starts"):
        text += f", warm starts {g['warm_starts']}"
    return text + (f" ({g['off_reason']})" if g.get("off_reason") else "")


def _e2e(sampling: float | None, vae: float | None, text: float | None = None) -> float | None:
    """Text encode (when timed) + sampling + VAE decode; the sampling time alone without a decode time."""
    if sampling is None or vae is None:
        return sampling
    return round((text or 0.0) + sampling + vae, 3)


def _median(xs: list[float] | None) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[len(s) // 2]


def _paths(p: dict[str, Any] | None) -> str | None:
    """"fused 114, text sharded" style digest of a row's attention-path counts (rank 0, timed request)."""
    if not p:
        return None
    parts = [f"{k} {p[k]}" for k in ("fused", "usp", "fallback") if p.get(k)]
    if p.get("fused") and p.get("fused_chunks", 1) > 1:
        parts[0] += f" (head chunks {p['fused_chunks']})"
    if p.get("text_sharded") or p.get("text_replicated"):
        parts.append("text sharded" if p.get("text_sharded") and not p.get("text_replicated") else
                     "text replicated" if not p.get("text_sharded") else "text mixed")
    if p.get("fallback_reason"):
        parts.append(f"fallback: {p['fallback_reason']}")
    return ", ".join(parts) or "no sequence parallel"
