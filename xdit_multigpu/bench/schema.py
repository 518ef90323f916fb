"""The shape of ``bench.json`` (schema ``xdit-bench/1``): ``problems(report)`` lists what is missing or
mistyped, so the CPU self-check (CI) fails when the benchmark's output rots."""

from __future__ import annotations

from typing import Any

NUM = (int, float)
TOP = {"schema": str, "environment": dict, "options": dict, "models": dict, "summary": list, "total_s": NUM,
       "side_by_side": dict}
ENV = {"date_utc": str, "python": str, "torch": str}
STOCK_SIZE = {"per_step_ms": NUM, "step_ms": list, "timed_wall_s": NUM}
ENGINE_ROW = {"plan": str, "per_step_ms": NUM, "step_ms": list, "per_step_ms_ranks": list, "timed_wall_s": NUM,
              "dispatch_ms": list, "peak_allocated_gb": list, "vs_stock": dict}
SUMMARY = {"model": str, "size": int, "gpus": int, "strategy": str, "per_step_ms": NUM}


def _check(obj: Any, spec: dict[str, Any], where: str, out: list[str]) -> None:
    if not isinstance(obj, dict):
        out.append(f"{where}: not an object")
        return
    for key, typ in spec.items():
        if key not in obj:
            out.append(f"{where}.{key}: missing")
        elif not isinstance(obj[key], typ):
            out.append(f"{where}.{key}: {type(obj[key]).__name__}, expected {typ}")


def problems(report: dict[str, Any]) -> list[str]:
    """Every schema problem of ``report`` (empty: valid). Errors recorded inside rows are problems too."""
    out: list[str] = []
    _check(report, TOP, "report", out)
    if report.get("schema") != "xdit-bench/1":
        out.append(f"report.schema: {report.get('schema')!r}")
    _check(report.get("environment"), ENV, "environment", out)
    for name, m in (report.get("models") or {}).items():
        if "skipped" in m:
            continue
        for size in m.get("sizes", []):
            _check((m.get("stock") or {}).get("sizes", {}).get(str(size)), STOCK_SIZE, f"{name}.stock[{size}]", out)
        if not m.get("engine"):
            out.append(f"{name}.engine: no device counts ran")
        for n, eng in (m.get("engine") or {}).items():
            if "error" in eng:
                out.append(f"{name}.engine[{n}]: {eng['error'][:300]}")
                continue
            if not isinstance(eng.get("pool_start_s"), NUM):
                out.append(f"{name}.engine[{n}].pool_start_s: missing")
            for key, row in eng.get("rows", {}).items():
                if "error" in row:
                    out.append(f"{name}.engine[{n}][{key}]: {row['error'][:300]}")
                else:
                    _check(row, ENGINE_ROW, f"{name}.engine[{n}][{key}]", out)
    for i, r in enumerate(report.get("summary") or []):
        if "skipped" not in r:
            _check(r, SUMMARY, f"summary[{i}]", out)
    return out
