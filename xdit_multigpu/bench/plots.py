"""Speedup-vs-GPUs charts for the benchmark report: PNG and SVG, one per model.

PNG through matplotlib when it is installed, else through Pillow (which ComfyUI itself requires), so
every environment that runs the report writes one; the SVG is hand-written text (no dependency).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
Series = dict[int, list[tuple[int, float]]]  # {image size: [(gpus, speedup vs our 1 GPU)]}


def speedup_series(rows: list[dict[str, Any]]) -> dict[str, Series]:
    """{model: {size: [(gpus, speedup vs our 1 GPU)]}} for the Hybrid rows."""
    series: dict[str, Series] = {}
    for r in rows:
        if r.get("strategy") == "Hybrid" and r.get("speedup_vs_ours_1"):
            series.setdefault(r["model"], {}).setdefault(r["size"], []).append((r["gpus"], r["speedup_vs_ours_1"]))
    return {m: {s: sorted(pts) for s, pts in by.items()} for m, by in series.items()}


def write_plots(rows: list[dict[str, Any]], plot_dir: str, rel_to: str) -> dict[str, str]:
    """One chart per model, PNG and SVG; returns {model: PNG path relative to ``rel_to``}."""
    os.makedirs(plot_dir, exist_ok=True)
    out = {}
    for model, by_size in speedup_series(rows).items():
        stem = os.path.join(plot_dir, f"speedup_{model}")
        with open(stem + ".svg", "w") as f:
            f.write(svg_chart(model, by_size))
        path = stem + ".svg"
        if _png(model, by_size, stem + ".png") or _png_pil(model, by_size, stem + ".png"):
            path = stem + ".png"
        out[model] = os.path.relpath(path, rel_to)
    return out


def _png(model: str, by_size: Series, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    top = max(g for pts in by_size.values() for g, _ in pts)
    ax.plot([1, top], [1, top], "--", color="#999", label="ideal")
    for i, (size, pts) in enumerate(sorted(by_size.items())):
        ax.plot([g for g, _ in pts], [s for _, s in pts], "o-", color=COLORS[i % len(COLORS)], label=f"{size}²")
    ax.set(xlabel="GPUs", ylabel="speedup vs our 1 GPU", title=f"{model}: per-step speedup")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


Pixels = Callable[[float, float], tuple[float, float]]  # (gpus, speedup) -> (x, y) in the picture


def _frame(by_size: Series, w: int, h: int, pad: int) -> tuple[int, float, Pixels]:
    """The charts' shared frame: GPUs axis 1..top, speedup axis 0..ymax (at least the ideal), and the map
    from (gpus, speedup) to pixels in a ``w`` x ``h`` picture with ``pad`` margins."""
    top = max([g for pts in by_size.values() for g, _ in pts] + [2])
    ymax = max([s for pts in by_size.values() for _, s in pts] + [top])

    def xy(g: float, s: float) -> tuple[float, float]:
        return pad + (g - 1) / max(1, top - 1) * (w - 2 * pad), h - pad - s / ymax * (h - 2 * pad)

    return top, ymax, xy


def svg_chart(model: str, by_size: Series) -> str:
    """A minimal line chart (speedup vs GPUs, ideal dashed) as SVG text."""
    w, h, pad = 420, 300, 48
    top, ymax, xy = _frame(by_size, w, h, pad)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<text x="{w / 2}" y="16" text-anchor="middle">{model}: per-step speedup vs our 1 GPU</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#000"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#000"/>',
             f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle">GPUs</text>']
    for g in range(1, top + 1):
        x, _ = xy(g, 0)
        parts.append(f'<text x="{x}" y="{h - pad + 14}" text-anchor="middle">{g}</text>')
    for k in range(0, int(ymax) + 1):
        _, y = xy(1, k)
        parts.append(f'<text x="{pad - 6}" y="{y + 4}" text-anchor="end">{k}</text>')
    (x1, y1), (x2, y2) = xy(1, 1), xy(top, top)
    parts.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#999" stroke-dasharray="4"/>')
    for i, (size, pts) in enumerate(sorted(by_size.items())):
        c = COLORS[i % len(COLORS)]
        poly = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(g, s) for g, s in pts))
        parts.append(f'<polyline points="{poly}" fill="none" stroke="{c}" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"/>' for x, y in (xy(g, s) for g, s in pts)]
        parts.append(f'<text x="{w - pad + 4}" y="{pad + 14 * i}" fill="{c}">{size}²</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def _png_pil(model: str, by_size: Series, path: str) -> bool:
    """The SVG chart's layout drawn with Pillow (no matplotlib): axes, ticks, ideal dashed, one line per size."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return False
    w, h, pad = 880, 600, 110
    top, ymax, xy = _frame(by_size, w, h, pad)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((w / 2, 20), f"{model}: per-step speedup vs our 1 GPU", fill="black", anchor="mm", font_size=22)
    d.line([(pad, h - pad), (w - pad, h - pad)], fill="black", width=2)
    d.line([(pad, pad), (pad, h - pad)], fill="black", width=2)
    d.text((w / 2, h - 24), "GPUs", fill="black", anchor="mm", font_size=20)
    for g in range(1, top + 1):
        d.text((xy(g, 0)[0], h - pad + 22), str(g), fill="black", anchor="mm", font_size=20)
    for k in range(0, int(ymax) + 1):
        d.text((pad - 12, xy(1, k)[1]), str(k), fill="black", anchor="rm", font_size=20)
    (x1, y1), (x2, y2) = xy(1, 1), xy(top, top)
    for i in range(0, 40, 2):  # the ideal, dashed
        a, b = i / 40, (i + 1) / 40
        d.line([(x1 + (x2 - x1) * a, y1 + (y2 - y1) * a), (x1 + (x2 - x1) * b, y1 + (y2 - y1) * b)], fill="#999999", width=2)
    for i, (size, pts) in enumerate(sorted(by_size.items())):
        c = COLORS[i % len(COLORS)]
        points = [xy(g, s) for g, s in pts]
        if len(points) > 1:
            d.line(points, fill=c, width=4)
        for x, y in points:
            d.ellipse([x - 6, y - 6, x + 6, y + 6], fill=c)
        d.text((w - pad + 8, pad + 28 * i), f"{size}x{size}", fill=c, anchor="lm", font_size=18)  # no "²" glyph
    img.save(path)
    return True
