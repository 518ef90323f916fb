"""The main job (``make demo``): a real ComfyUI server with this pack on 127.0.0.1 runs a shipped example
workflow on generated tiny models, saves the image, and prints where it went and how long it took.

    python -m xdit_multigpu.testing.demo [--workflow sd3_xdit_multigpu] [--devices cpu:2] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any

from .server import REPO, ComfyServer, prepare_base_dir, saved_images
from .workflow import ui_to_api

EXAMPLES = REPO / "example_workflows"
# Which tiny model stands in for each loader input of the shipped SD3 workflow.
TINY_FOR_INPUT = {
    ("XDiTUNetLoader", "unet_name"): "sd3",
    ("XDiTCLIPLoader", "clip_name"): "clip_l",
    ("XDiTVAELoader", "vae_name"): "vae16",
}
LATENT_NODES = ("EmptySD3LatentImage", "EmptyLatentImage")


def load_example(name: str, object_info: dict[str, Any]) -> dict[str, Any]:
    return ui_to_api(json.loads((EXAMPLES / f"{name}.json").read_text()), object_info)


def adapt_to_tiny(prompt: dict[str, Any], tiny: dict[str, Any], devices: str, steps: int, size: int) -> dict[str, Any]:
    """Point the workflow's loaders at the tiny models and shrink the job; everything else is as shipped."""
    for node in prompt.values():
        cls, inputs = node["class_type"], node["inputs"]
        for (node_cls, field), family in TINY_FOR_INPUT.items():
            if cls == node_cls and field in inputs:
                inputs[field] = os.path.basename(tiny[family].path)
        if "gpu_devices" in inputs:
            inputs["gpu_devices"] = devices
        if cls in LATENT_NODES:
            inputs["width"] = inputs["height"] = size
        if cls == "XDiTKSampler":
            inputs["steps"] = steps
    return prompt


def node_text(entry: dict[str, Any], class_type: str, prompt: dict[str, Any]) -> str:
    ids = [i for i, n in prompt.items() if n["class_type"] == class_type]
    texts = [t for i in ids for t in entry.get("outputs", {}).get(i, {}).get("text", [])]
    return " | ".join(texts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", default="sd3_xdit_multigpu", help="example_workflows/<name>.json")
    ap.add_argument("--devices", default="cpu:2", help='gpu_devices for the run (default "cpu:2": 2 CPU ranks)')
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="image width and height")
    ap.add_argument("--out", default=str(REPO / "out"), help="output directory for the image")
    args = ap.parse_args(argv)

    comfy_root = pathlib.Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "comfyui").resolve()
    base = prepare_base_dir(REPO / ".host" / "demo")
    out_dir = pathlib.Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    from .tiny_models import write_tiny_models

    t0 = time.perf_counter()
    tiny = write_tiny_models(str(base / "models"), families=sorted(set(TINY_FOR_INPUT.values())),
                             comfy_root=str(comfy_root))
    print(f"[demo] tiny models ready in {time.perf_counter() - t0:.1f} s under {base / 'models'}")
    t0 = time.perf_counter()
    with ComfyServer(comfy_root, base, extra_args=["--output-directory", str(out_dir)]) as server:
        print(f"[demo] ComfyUI up at {server.url} in {time.perf_counter() - t0:.1f} s (log: {base / 'server.log'})")
        prompt = adapt_to_tiny(load_example(args.workflow, server.get("/object_info")), tiny,
                               args.devices, args.steps, args.size)
        t0 = time.perf_counter()
        entry = server.run(prompt)
        took = time.perf_counter() - t0
    if entry["status"]["status_str"] != "success":
        print(f"[demo] the workflow failed: {json.dumps(entry['status'])[:3000]}", file=sys.stderr)
        return 1
    images = saved_images(entry, out_dir)
    print(f"[demo] KSampler (xDiT Multi-GPU): {node_text(entry, 'XDiTKSampler', prompt)}")
    for path in images:
        print(f"[demo] image written: {path}")
    print(f"[demo] workflow {args.workflow} on {args.devices}: {took:.1f} s (queue to saved image)")
    return 0 if images and all(p.is_file() for p in images) else 1


if __name__ == "__main__":
    sys.exit(main())
