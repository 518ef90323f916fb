"""Pins of the ComfyUI symbols, signatures and call sites the Lumina 2 / Z-Image and Wan hooks rely on
(``xdit_multigpu/models/lumina.py``, ``models/wan.py``). Same conventions as ``test_host_pins.py``:
source checks compare with all whitespace removed, so reformatting passes and a changed call fails.
"""

from __future__ import annotations

import pytest

from tests.comfy.test_host_pins import _has, _params

pytestmark = pytest.mark.comfy


def test_config_classes(comfy_root: str) -> None:
    """The spec looks the families up by these exact class names; Wan 2.2 A14B loads as WAN21_T2V."""
    import comfy.supported_models as sm

    from xdit_multigpu.models import families, lookup

    assert families.LUMINA2.config_classes == ("Lumina2", "ZImage")
    assert families.WAN_T2V.config_classes == ("WAN21_T2V", "WAN22_T2V")
    assert issubclass(sm.ZImage, sm.Lumina2) and sm.ZImage.unet_config["dim"] == 3840
    assert sm.WAN21_T2V.unet_config["model_type"] == "t2v" and sm.WAN22_T2V.unet_config["model_type"] == "t2v"
    for refused in ("WAN21_I2V", "WAN21_Vace", "WAN21_Camera", "WAN22_S2V", "WAN22_Animate", "WAN21_HuMo"):
        assert hasattr(sm, refused) and lookup(refused) is None


def test_nextdit_hooks(comfy_root: str) -> None:
    """``models/lumina.py``: object patches on ``noise_refiner.{i}`` (shard x, slice the image RoPE rows) and
    ``layers.{i}`` (caption + local image, RoPE = [caption | local rows], gather after the last); the caption
    refiner runs before the noise refiner; attention goes through the override via transformer_options."""
    from comfy.ldm.lumina import model as lumina

    nextdit = lumina.NextDiT
    _has(nextdit.forward, "WrappersMP.DIFFUSION_MODEL", 'kwargs.get("transformer_options", {})')
    _has(nextdit.patchify_and_embed,
         "freqs_cis = self.rope_embedder(torch.cat((cap_pos_ids, x_pos_ids), dim=1)).movedim(1, 2)",
         "for layer in self.context_refiner:",
         "cap_feats = layer(cap_feats, cap_mask, freqs_cis[:, :cap_pos_ids.shape[1]], "
         "transformer_options=transformer_options)",
         "for layer in self.noise_refiner:",
         "x = layer(x, padded_img_mask, freqs_cis[:, cap_pos_ids.shape[1]:], t, "
         "transformer_options=transformer_options)",
         "padded_full_embed = torch.cat((cap_feats, x), dim=1)", "mask = None")
    _has(nextdit._forward, "for layer in self.layers:",
         "x = layer(x, mask, freqs_cis, adaln_input, transformer_options=transformer_options)",
         "x = self.final_layer(x, adaln_input)", "x = self.unpatchify(x, img_size, cap_size")
    assert _params(lumina.JointTransformerBlock.forward)[1:] == ["x", "x_mask", "freqs_cis", "adaln_input",
                                                                 "transformer_options"]
    _has(lumina.JointAttention.forward, "xq, xk = apply_rope(xq, xk, freqs_cis)",
         "optimized_attention_masked(xq.movedim(1, 2), xk.movedim(1, 2), xv.movedim(1, 2), self.n_local_heads, x_mask, "
         "skip_reshape=True, transformer_options=transformer_options)")
    # RoPE table rows are tokens (dim 1) after movedim(1, 2): what slice_like(..., dim=1) cuts
    import torch

    from comfy.ldm.flux.layers import EmbedND

    assert EmbedND(32, 10000, [8, 12, 12])(torch.zeros(1, 5, 3)).movedim(1, 2).shape[:2] == (1, 5)


def test_wan_hooks(comfy_root: str) -> None:
    """``models/wan.py``: ("double_block", i) replaces on every block (img / vec / pe / transformer_options),
    cross-attention object patch (x, context, transformer_options), self-attention through the override."""
    from comfy.ldm.wan import model as wan

    _has(wan.WanModel.forward, "WrappersMP.DIFFUSION_MODEL",
         ".execute(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)")
    _has(wan.WanModel._forward, "freqs = self.rope_encode(t_len, h, w", "return self.forward_orig(")
    _has(wan.WanModel.rope_encode, "img_ids = img_ids.reshape(1, -1, img_ids.shape[-1])",
         "freqs = self.rope_embedder(img_ids).movedim(1, 2)")
    _has(wan.WanModel.forward_orig, "x = x.flatten(2).transpose(1, 2)",
         "e0 = self.time_projection(e).unflatten(2, (6, self.dim))",
         '("double_block", i) in blocks_replace',
         'out["img"] = block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"], '
         'context_img_len=context_img_len, transformer_options=args["transformer_options"])',
         'blocks_replace[("double_block", i)]({"img": x, "txt": context, "vec": e0, "pe": freqs, '
         '"transformer_options": transformer_options}, {"original_block": block_wrap})',
         "x = self.head(x, e)", "x = self.unpatchify(x, grid_sizes)")
    _has(wan.WanAttentionBlock.forward, "y = self.self_attn(", "freqs, transformer_options=transformer_options)",
         "x = x + self.cross_attn(self.norm3(x), context, context_img_len=context_img_len, "
         "transformer_options=transformer_options)")
    _has(wan.WanSelfAttention.forward, "optimized_attention(", "transformer_options=transformer_options")
    assert _params(wan.WanT2VCrossAttention.forward)[1:] == ["x", "context", "transformer_options", "kwargs"]
    _has(wan.WanT2VCrossAttention.forward,
         "x = optimized_attention(q, k, v, heads=self.num_heads, transformer_options=transformer_options)")
    # per-frame modulation spread over tokens: models/wan.local_vec reproduces this before slicing
    _has(wan.repeat_e, "repeats = x.size(1) // e.size(1)", "return torch.repeat_interleave(e, repeats, dim=1)",
         "return torch.repeat_interleave(e, repeats + 1, dim=1)[:, :x.size(1)]")


def test_local_vec_matches_repeat_e(comfy_root: str) -> None:
    """``local_vec`` then the block's own ``repeat_e`` on the local rows == ComfyUI's ``repeat_e`` on the
    full stream, sliced (divisible and not divisible token counts)."""
    import torch
    from comfy.ldm.wan.model import repeat_e

    from xdit_multigpu.models.wan import local_vec
    from xdit_multigpu.parallel.sequence import SequenceParallel, SequenceState, Shard

    class _Ctx(SequenceParallel):
        def __init__(self) -> None:  # no groups: only slice_like is used
            pass

    for frames, tokens, sizes in ((3, 27, (14, 13)), (2, 18, (5, 5, 4, 4)), (4, 10, (4, 3, 3))):
        vec = torch.randn(1, frames, 6, 8)
        full = torch.randn(1, tokens, 8)
        for index in range(len(sizes)):
            state = SequenceState(shard=Shard(sizes, index), active=True)
            local = local_vec(_Ctx(), state, vec)
            off = sum(sizes[:index])
            for j in range(6):
                want = repeat_e(vec[:, :, j], full)[:, off: off + sizes[index]]
                got = repeat_e(local[:, :, j], full[:, off: off + sizes[index]])
                assert torch.equal(got, want), (frames, tokens, index)
