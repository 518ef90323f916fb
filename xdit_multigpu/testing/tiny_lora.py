"""A tiny deterministic LoRA for a tiny diffusion-model file, in the key format ComfyUI's loader maps.

Keys: ``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` for every 2-D
``<module>.weight`` of the model file whose name contains ``only`` (default: the transformer blocks):
``comfy.lora.model_lora_keys_unet`` maps ``diffusion_model.<module>`` to ``diffusion_model.<module>.weight``
for every model type ("generic lora format"), so stock ``LoraLoader`` / ``LoraLoaderModelOnly`` apply it.
"""

from __future__ import annotations

import hashlib
import os


def write_tiny_lora(model_path: str, out_path: str, rank: int = 4, scale: float = 0.05, seed: int = 0,
                    only: str = "blocks") -> list[str]:
    """Write the LoRA for ``model_path`` (a diffusion-model ``.safetensors``) to ``out_path``.

    Returns the patched model keys (``diffusion_model.<module>.weight``). Deterministic for the same
    inputs; rewritten only when the content would change.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(model_path, "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    targets = sorted(k for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2 and only in k)
    if not targets:
        raise ValueError(f"{model_path}: no 2-D weight whose name contains {only!r} to put a LoRA on")
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key in targets:
        out_dim, in_dim = shapes[key]
        base = "diffusion_model." + key[: -len(".weight")]
        sd[f"{base}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * scale
        sd[f"{base}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen)
        sd[f"{base}.alpha"] = torch.tensor(float(rank))
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in sd.values())).hexdigest()
    if not _same(out_path, digest):
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        tmp = out_path + ".tmp"
        save_file(sd, tmp, metadata={"xdit_tiny_lora": digest})
        os.replace(tmp, out_path)
    return ["diffusion_model." + k for k in targets]


def _same(path: str, digest: str) -> bool:
    if not os.path.isfile(path):
        return False
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("xdit_tiny_lora") == digest
