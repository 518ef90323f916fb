#!/usr/bin/env python3
"""Writes example_workflows/*.json (ComfyUI UI format) from the compact graphs below.

Widget values are listed in each node's input order (as /object_info reports it); seeds carry the
frontend's extra "control_after_generate" value. Re-run after changing a graph:
    python3 tools/build_example_workflows.py
"""

from __future__ import annotations

import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parents[1] / "example_workflows"
DISPATCH = ["all", "Hybrid", "round_robin", 0, "", ""]  # gpu_devices, parallel_strategy, scheduling_strategy,
# gpus_per_group, group_weights, ray_address

# Output slot types per node type (the UI format stores them).
OUTPUTS = {
    "XDiTUNetLoader": ["MODEL", "XDIT_DISPATCHER"],
    "XDiTCheckpointLoader": ["MODEL", "CLIP", "VAE", "XDIT_DISPATCHER"],
    "XDiTCLIPLoader": ["CLIP"], "XDiTDualCLIPLoader": ["CLIP"], "XDiTVAELoader": ["VAE"],
    "CLIPTextEncode": ["CONDITIONING"], "FluxGuidance": ["CONDITIONING"],
    "EmptySD3LatentImage": ["LATENT"], "EmptyLatentImage": ["LATENT"], "XDiTKSampler": ["LATENT"],
    "VAEDecode": ["IMAGE"], "SaveImage": [], "Note": [],
    "ModelSamplingAuraFlow": ["MODEL"],
    "ModelSamplingSD3": ["MODEL"], "EmptyHunyuanLatentVideo": ["LATENT"], "Wan22ImageToVideoLatent": ["LATENT"],
    "SaveAnimatedWEBP": [],
}


def ksampler(seed: int, steps: int, cfg: float, sampler: str = "euler", scheduler: str = "simple") -> list:
    return [seed, "fixed", steps, cfg, sampler, scheduler, 1.0]


def build(title: str, nodes: list[tuple], edges: list[tuple]) -> dict:
    """nodes: (id, type, widgets_values, [input names]); edges: (src id, src slot, dst id, dst input name)."""
    by_id = {n[0]: n for n in nodes}
    ui_nodes, links = [], []
    inputs: dict[int, list[dict]] = {n[0]: [{"name": name, "type": "*", "link": None} for name in n[3]] for n in nodes}
    outputs: dict[int, list[dict]] = {
        n[0]: [{"name": t, "type": t, "links": []} for t in OUTPUTS[n[1]]] for n in nodes
    }
    for link_id, (src, slot, dst, name) in enumerate(edges, start=1):
        typ = OUTPUTS[by_id[src][1]][slot]
        links.append([link_id, src, slot, dst, [i["name"] for i in inputs[dst]].index(name), typ])
        entry = next(i for i in inputs[dst] if i["name"] == name)
        entry.update(type=typ, link=link_id)
        outputs[src][slot]["links"].append(link_id)
    for order, (nid, ntype, values, _) in enumerate(nodes):
        col, row = divmod(order, 4)
        ui_nodes.append({
            "id": nid, "type": ntype, "pos": [60 + 360 * col, 60 + 220 * row], "size": [320, 180], "flags": {},
            "order": order, "mode": 0, "inputs": inputs[nid], "outputs": outputs[nid],
            "properties": {"Node name for S&R": ntype}, "widgets_values": values,
        })
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"title": title}, "version": 0.4}


def flux() -> dict:
    return build("Flux.1-dev on all GPUs (xDiT)", [
        (1, "XDiTUNetLoader", ["flux1-dev.safetensors", "default", *DISPATCH], []),
        (2, "XDiTDualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"], []),
        (3, "CLIPTextEncode", ["a lighthouse on a cliff at dawn, volumetric light"], ["clip"]),
        (4, "FluxGuidance", [3.5], ["conditioning"]),
        (5, "CLIPTextEncode", [""], ["clip"]),
        (6, "EmptySD3LatentImage", [1024, 1024, 1], []),
        (7, "XDiTKSampler", ksampler(42, 20, 1.0), ["model", "positive", "negative", "latent_image", "xdit_dispatcher"]),
        (8, "XDiTVAELoader", ["ae.safetensors", "default"], []),
        (9, "VAEDecode", [], ["samples", "vae"]),
        (10, "SaveImage", ["xdit_flux"], ["images"]),
    ], [(2, 0, 3, "clip"), (3, 0, 4, "conditioning"), (2, 0, 5, "clip"), (1, 0, 7, "model"), (4, 0, 7, "positive"),
        (5, 0, 7, "negative"), (6, 0, 7, "latent_image"), (1, 1, 7, "xdit_dispatcher"), (7, 0, 9, "samples"),
        (8, 0, 9, "vae"), (9, 0, 10, "images")])


def sd3() -> dict:
    return build("SD3.5 on all GPUs (xDiT): CFG x sequence parallel", [
        (1, "XDiTUNetLoader", ["sd3.5_large.safetensors", "default", *DISPATCH], []),
        (2, "XDiTCLIPLoader", ["clip_l.safetensors", "sd3", "default"], []),
        (3, "CLIPTextEncode", ["a red fox in fresh snow, telephoto, golden hour"], ["clip"]),
        (4, "CLIPTextEncode", ["blurry, low quality"], ["clip"]),
        (5, "EmptySD3LatentImage", [1024, 1024, 1], []),
        (6, "XDiTKSampler", ksampler(7, 28, 4.5, "dpmpp_2m", "sgm_uniform"),
         ["model", "positive", "negative", "latent_image", "xdit_dispatcher"]),
        (7, "XDiTVAELoader", ["sd3_vae.safetensors", "default"], []),
        (8, "VAEDecode", [], ["samples", "vae"]),
        (9, "SaveImage", ["xdit_sd3"], ["images"]),
        (10, "Note", ["Load CLIP (xDiT) with type sd3 accepts any of clip_l / clip_g / t5xxl; for full quality load "
                      "all three with the stock TripleCLIPLoader and connect its CLIP instead."], []),
    ], [(2, 0, 3, "clip"), (2, 0, 4, "clip"), (1, 0, 6, "model"), (3, 0, 6, "positive"), (4, 0, 6, "negative"),
        (5, 0, 6, "latent_image"), (1, 1, 6, "xdit_dispatcher"), (6, 0, 8, "samples"), (7, 0, 8, "vae"),
        (8, 0, 9, "images")])


def checkpoint_graph(title: str, ckpt: str, prompt: str, latent: str, k: list, prefix: str) -> dict:
    return build(title, [
        (1, "XDiTCheckpointLoader", [ckpt, *DISPATCH], []),
        (2, "CLIPTextEncode", [prompt], ["clip"]),
        (3, "CLIPTextEncode", ["blurry, low quality, watermark"], ["clip"]),
        (4, latent, [1024, 1024, 1], []),
        (5, "XDiTKSampler", k, ["model", "positive", "negative", "latent_image", "xdit_dispatcher"]),
        (6, "VAEDecode", [], ["samples", "vae"]),
        (7, "SaveImage", [prefix], ["images"]),
    ], [(1, 1, 2, "clip"), (1, 1, 3, "clip"), (1, 0, 5, "model"), (2, 0, 5, "positive"), (3, 0, 5, "negative"),
        (4, 0, 5, "latent_image"), (1, 3, 5, "xdit_dispatcher"), (5, 0, 6, "samples"), (1, 2, 6, "vae"),
        (6, 0, 7, "images")])


def pixart() -> dict:
    return build("PixArt-Sigma on two GPUs (xDiT CFG parallel)", [
        (1, "XDiTUNetLoader", ["PixArt-Sigma-XL-2-1024-MS.safetensors", "default", *DISPATCH], []),
        (2, "XDiTCLIPLoader", ["t5xxl_fp16.safetensors", "pixart", "default"], []),
        (3, "CLIPTextEncode", ["a cozy reading nook with plants, soft window light"], ["clip"]),
        (4, "CLIPTextEncode", ["blurry, low quality"], ["clip"]),
        (5, "EmptyLatentImage", [1024, 1024, 1], []),
        (6, "XDiTKSampler", ksampler(3, 20, 4.5, "dpmpp_2m", "karras"),
         ["model", "positive", "negative", "latent_image", "xdit_dispatcher"]),
        (7, "XDiTVAELoader", ["sdxl_vae.safetensors", "default"], []),
        (8, "VAEDecode", [], ["samples", "vae"]),
        (9, "SaveImage", ["xdit_pixart"], ["images"]),
    ], [(2, 0, 3, "clip"), (2, 0, 4, "clip"), (1, 0, 6, "model"), (3, 0, 6, "positive"), (4, 0, 6, "negative"),
        (5, 0, 6, "latent_image"), (1, 1, 6, "xdit_dispatcher"), (6, 0, 8, "samples"), (7, 0, 8, "vae"),
        (8, 0, 9, "images")])


def chroma() -> dict:
    return build("Chroma on all GPUs (xDiT): CFG x sequence parallel", [
        (1, "XDiTUNetLoader", ["chroma-unlocked-v48.safetensors", "default", *DISPATCH], []),
        (2, "XDiTCLIPLoader", ["t5xxl_fp16.safetensors", "chroma", "default"], []),
        (3, "CLIPTextEncode", ["a glass greenhouse at night full of glowing orchids, 35mm photo"], ["clip"]),
        (4, "CLIPTextEncode", ["low quality, blurry, bad anatomy, watermark"], ["clip"]),
        (5, "EmptySD3LatentImage", [1024, 1024, 1], []),
        (6, "XDiTKSampler", ksampler(21, 26, 4.0, "euler", "beta"),
         ["model", "positive", "negative", "latent_image", "xdit_dispatcher"]),
        (7, "XDiTVAELoader", ["ae.safetensors", "default"], []),
        (8, "VAEDecode", [], ["samples", "vae"]),
        (9, "SaveImage", ["xdit_chroma"], ["images"]),
    ], [(2, 0, 3, "clip"), (2, 0, 4, "clip"), (1, 0, 6, "model"), (3, 0, 6, "positive"), (4, 0, 6, "negative"),
        (5, 0, 6, "latent_image"), (1, 1, 6, "xdit_dispatcher"), (6, 0, 8, "samples"), (7, 0, 8, "vae"),
        (8, 0, 9, "images")])


def qwen_image() -> dict:
    return build("Qwen-Image on all GPUs (xDiT): CFG x sequence parallel", [
        (1, "XDiTUNetLoader", ["qwen_image_fp8_e4m3fn.safetensors", "default", *DISPATCH], []),
        (2, "ModelSamplingAuraFlow", [3.1], ["model"]),
        (3, "XDiTCLIPLoader", ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "default"], []),
        (4, "CLIPTextEncode", ['a bookshop window with a hand-painted sign reading "Open Late", rainy street'],
         ["clip"]),
        (5, "CLIPTextEncode", [""], ["clip"]),
        (6, "EmptySD3LatentImage", [1328, 1328, 1], []),
        (7, "XDiTKSampler", ksampler(9, 20, 2.5, "euler", "simple"),
         ["model", "positive", "negative", "latent_image", "xdit_dispatcher"]),
        (8, "XDiTVAELoader", ["qwen_image_vae.safetensors", "default"], []),
        (9, "VAEDecode", [], ["samples", "vae"]),
        (10, "SaveImage", ["xdit_qwen_image"], ["images"]),
    ], [(1, 0, 2, "model"), (3, 0, 4, "clip"), (3, 0, 5, "clip"), (2, 0, 7, "model"), (4, 0, 7, "positive"),
        (5, 0, 7, "negative"), (6, 0, 7, "latent_image"), (1, 1, 7, "xdit_dispatcher"), (7, 0, 9, "samples"),
        (8, 0, 9, "vae"), (9, 0, 10, "images")])


LUMINA2_SYSTEM = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                  "alignment based on textual prompts or user prompts. <Prompt Start> ")


def lumina_graph(title: str, unet: str, te: str, prompt: str, shift: float, k: list, prefix: str) -> dict:
    """Lumina 2 / Z-Image: Load CLIP type lumina2 (Gemma 2 2B, or Qwen3 4B which ComfyUI detects for Z-Image)."""
    return build(title, [
        (1, "XDiTUNetLoader", [unet, "default", *DISPATCH], []),
        (2, "ModelSamplingAuraFlow", [shift], ["model"]),
        (3, "XDiTCLIPLoader", [te, "lumina2", "default"], []),
        (4, "CLIPTextEncode", [prompt], ["clip"]),
        (5, "CLIPTextEncode", ["blurry, low quality" if k[3] > 1.0 else ""], ["clip"]),
        (6, "EmptySD3LatentImage", [1024, 1024, 1], []),
        (7, "XDiTKSampler", k, ["model", "positive", "negative", "latent_image", "xdit_dispatcher"]),
        (8, "XDiTVAELoader", ["ae.safetensors", "default"], []),
        (9, "VAEDecode", [], ["samples", "vae"]),
        (10, "SaveImage", [prefix], ["images"]),
    ], [(1, 0, 2, "model"), (3, 0, 4, "clip"), (3, 0, 5, "clip"), (2, 0, 7, "model"), (4, 0, 7, "positive"),
        (5, 0, 7, "negative"), (6, 0, 7, "latent_image"), (1, 1, 7, "xdit_dispatcher"), (7, 0, 9, "samples"),
        (8, 0, 9, "vae"), (9, 0, 10, "images")])


def wan21_t2v() -> dict:
    """Wan 2.1 T2V (also Wan 2.2 A14B T2V high / low noise files): 5-D video latent, animated WEBP out."""
    return build("Wan 2.1 text-to-video on all GPUs (xDiT): CFG x sequence parallel over video tokens", [
        (1, "XDiTUNetLoader", ["wan2.1_t2v_1.3B_fp16.safetensors", "default", *DISPATCH], []),
        (2, "ModelSamplingSD3", [8.0], ["model"]),
        (3, "XDiTCLIPLoader", ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], []),
        (4, "CLIPTextEncode", ["a red panda walking through fresh snow in a bamboo forest, cinematic"], ["clip"]),
        (5, "CLIPTextEncode", ["static, blurry, low quality, watermark, subtitles"], ["clip"]),
        (6, "EmptyHunyuanLatentVideo", [832, 480, 33, 1], []),
        (7, "XDiTKSampler", ksampler(17, 30, 6.0, "uni_pc", "simple"),
         ["model", "positive", "negative", "latent_image", "xdit_dispatcher"]),
        (8, "XDiTVAELoader", ["wan_2.1_vae.safetensors", "default"], []),
        (9, "VAEDecode", [], ["samples", "vae"]),
        (10, "SaveAnimatedWEBP", ["xdit_wan21", 16.0, False, 90, "default"], ["images"]),
    ], [(1, 0, 2, "model"), (3, 0, 4, "clip"), (3, 0, 5, "clip"), (2, 0, 7, "model"), (4, 0, 7, "positive"),
        (5, 0, 7, "negative"), (6, 0, 7, "latent_image"), (1, 1, 7, "xdit_dispatcher"), (7, 0, 9, "samples"),
        (8, 0, 9, "vae"), (9, 0, 10, "images")])


def wan22_t2v() -> dict:
    """Wan 2.2 TI2V-5B as text-to-video (Wan22ImageToVideoLatent without a start image: no noise mask)."""
    return build("Wan 2.2 5B text-to-video on all GPUs (xDiT): CFG x sequence parallel over video tokens", [
        (1, "XDiTUNetLoader", ["wan2.2_ti2v_5B_fp16.safetensors", "default", *DISPATCH], []),
        (2, "ModelSamplingSD3", [8.0], ["model"]),
        (3, "XDiTCLIPLoader", ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], []),
        (4, "CLIPTextEncode", ["a paper boat drifting down a rain gutter, macro lens, shallow depth of field"],
         ["clip"]),
        (5, "CLIPTextEncode", ["static, blurry, low quality, watermark, subtitles"], ["clip"]),
        (6, "XDiTVAELoader", ["wan2.2_vae.safetensors", "default"], []),
        (7, "Wan22ImageToVideoLatent", [1280, 704, 49, 1], ["vae"]),
        (8, "XDiTKSampler", ksampler(23, 20, 5.0, "uni_pc", "simple"),
         ["model", "positive", "negative", "latent_image", "xdit_dispatcher"]),
        (9, "VAEDecode", [], ["samples", "vae"]),
        (10, "SaveAnimatedWEBP", ["xdit_wan22", 24.0, False, 90, "default"], ["images"]),
    ], [(1, 0, 2, "model"), (3, 0, 4, "clip"), (3, 0, 5, "clip"), (6, 0, 7, "vae"), (2, 0, 8, "model"),
        (4, 0, 8, "positive"), (5, 0, 8, "negative"), (7, 0, 8, "latent_image"), (1, 1, 8, "xdit_dispatcher"),
        (8, 0, 9, "samples"), (6, 0, 9, "vae"), (9, 0, 10, "images")])


WORKFLOWS = {
    "flux_xdit_multigpu": flux,
    "sd3_xdit_multigpu": sd3,
    "sdxl_xdit_multigpu": lambda: checkpoint_graph(
        "SDXL on two GPUs (xDiT CFG parallel)", "sd_xl_base_1.0.safetensors",
        "a watercolor of a mountain village, morning mist", "EmptyLatentImage",
        ksampler(11, 25, 7.0, "dpmpp_2m", "karras"), "xdit_sdxl"),
    "pixart_sigma_xdit_multigpu": pixart,
    "hunyuan_dit_xdit_multigpu": lambda: checkpoint_graph(
        "HunyuanDiT on two GPUs (xDiT CFG parallel)", "hunyuan_dit_1.2.safetensors",
        "a tea house in a bamboo forest, ink painting", "EmptyLatentImage",
        ksampler(5, 25, 6.0, "euler", "normal"), "xdit_hunyuan_dit"),
    "chroma_xdit_multigpu": chroma,
    "qwen_image_xdit_multigpu": qwen_image,
    "lumina2_xdit_multigpu": lambda: lumina_graph(
        "Lumina Image 2.0 on all GPUs (xDiT): CFG x sequence parallel", "lumina_2_model_bf16.safetensors",
        "gemma_2_2b_fp16.safetensors", LUMINA2_SYSTEM + "a fox made of origami in a paper forest, soft studio light",
        6.0, ksampler(31, 25, 4.0, "res_multistep", "simple"), "xdit_lumina2"),
    "z_image_xdit_multigpu": lambda: lumina_graph(
        "Z-Image Turbo on all GPUs (xDiT): sequence parallel (cfg 1)", "z_image_turbo_bf16.safetensors",
        "qwen_3_4b.safetensors", "a street food stall at night in the rain, neon reflections, 35mm photo",
        3.0, ksampler(37, 9, 1.0, "res_multistep", "simple"), "xdit_z_image"),
    "wan21_t2v_xdit_multigpu": wan21_t2v,
    "wan22_t2v_xdit_multigpu": wan22_t2v,
}

if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        (OUT / f"{name}.json").write_text(json.dumps(make(), indent=1) + "\n")
        print(f"wrote example_workflows/{name}.json")
