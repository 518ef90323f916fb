"""Pins of the ComfyUI symbols, signatures and call sites every family's hooks rely on.

The pack injects parallelism only through ComfyUI extension points and, for models whose forward passes
no ``transformer_options`` (PixArt, HunyuanDiT self-attention), through object patches that redo a
module's forward with ComfyUI's own sub-modules. A ComfyUI update that moves any of these must fail here
(with the symbol named), not silently run the model unsharded or with a stale re-implementation.

Source checks compare with all whitespace removed, so reformatting passes and a changed call fails.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.comfy


def _squash(text: str) -> str:
    return "".join(text.split())


def _source(obj: Any) -> str:
    return _squash(inspect.getsource(obj))


def _has(obj: Any, *needles: str) -> None:
    """Every needle occurs in ``obj``'s source (whitespace-insensitive), in the given order."""
    src, pos = _source(obj), 0
    for needle in needles:
        at = src.find(_squash(needle), pos)
        assert at >= 0, f"{_name(obj)} no longer contains {needle!r} (after the previous pins)"
        pos = at


def _name(obj: Any) -> str:
    """``module.qualname`` of a function / class, or a module's own name (pins read modules too)."""
    return obj.__name__ if inspect.ismodule(obj) else f"{obj.__module__}.{obj.__qualname__}"


def _params(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _symbol(path: str) -> Any:
    module, _, attr = path.rpartition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# --- every family -------------------------------------------------------------------------------------


def test_registered_config_classes_exist(comfy_root: str) -> None:
    """Lookup is by the exact ``supported_models`` class name: every declared name must still exist."""
    import comfy.supported_models

    from xdit_multigpu.models import all_specs

    for spec in all_specs():
        for name in spec.config_classes:
            assert isinstance(getattr(comfy.supported_models, name, None), type), f"{spec.name}: {name} is gone"


def test_model_patcher_extension_points(comfy_root: str) -> None:
    from comfy.model_patcher import ModelPatcher
    from comfy.patcher_extension import WrappersMP

    for name in ("CALC_COND_BATCH", "DIFFUSION_MODEL", "APPLY_MODEL"):
        assert hasattr(WrappersMP, name), f"WrappersMP.{name} is gone"
    assert _params(ModelPatcher.add_wrapper_with_key)[1:] == ["wrapper_type", "key", "wrapper"]
    assert _params(ModelPatcher.remove_wrappers_with_key)[1:] == ["wrapper_type", "key"]
    assert _params(ModelPatcher.set_model_patch_replace)[1:5] == ["patch", "name", "block_name", "number"]
    assert _params(ModelPatcher.set_model_post_input_patch)[1:] == ["patch"]
    assert _params(ModelPatcher.add_object_patch)[1:] == ["name", "obj"]
    # object patches: copied per clone, set on patch_model, restored on unpatch_model
    _has(ModelPatcher.clone, "n.object_patches = self.object_patches.copy()")
    _has(ModelPatcher.patch_model, "for k in self.object_patches:", "comfy.utils.set_attr(self.model, k, self.object_patches[k])")
    _has(ModelPatcher.unpatch_model, "comfy.utils.set_attr(self.model, k, self.object_patches_backup[k])")


def test_cfg_wrapper_call_site(comfy_root: str) -> None:
    """``parallel/cfg.py``: the CALC_COND_BATCH wrapper gets ``(executor, model, conds, x_in, timestep,
    model_options)`` and ComfyUI returns zeros for a None cond."""
    import comfy.samplers

    _has(comfy.samplers._calc_cond_batch_outer, "WrappersMP.CALC_COND_BATCH",
         "execute(model, conds, x_in, timestep, model_options)")
    assert _params(comfy.samplers._calc_cond_batch) == ["model", "conds", "x_in", "timestep", "model_options"]


def test_apply_model_wrapper_call_site(comfy_root: str) -> None:
    """The SP ControlNet guard is an APPLY_MODEL wrapper taking ``(x, t, c_concat, c_crossattn, control,
    transformer_options, **kwargs)``."""
    from comfy.model_base import BaseModel

    _has(BaseModel.apply_model, "WrappersMP.APPLY_MODEL")
    assert _params(BaseModel._apply_model)[1:7] == ["x", "t", "c_concat", "c_crossattn", "control", "transformer_options"]


def test_attention_override_is_consulted(comfy_root: str) -> None:
    import comfy.ldm.modules.attention as attention

    _has(attention.wrap_attn, 'transformer_options = kwargs.get("transformer_options", None)',
         'if "optimized_attention_override" in transformer_options:',
         'return transformer_options["optimized_attention_override"](func, *args, **kwargs)')
    assert getattr(attention.optimized_attention, "__wrapped__", None) is not None, "optimized_attention is not wrap_attn'd"


# --- Flux -----------------------------------------------------------------------------------------------


def test_flux_hooks(comfy_root: str) -> None:
    from comfy.ldm.flux import math as flux_math
    from comfy.ldm.flux.model import Flux

    _has(Flux.forward, "WrappersMP.DIFFUSION_MODEL",
         "execute(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)")
    _has(Flux.forward_orig,
         'if "post_input" in patches:', 'p({"img": img, "txt": txt, "img_ids": img_ids, "txt_ids": txt_ids})',
         "ids = torch.cat((txt_ids, img_ids), dim=1)", "pe = self.pe_embedder(ids)",  # RoPE after post_input
         '("double_block", i) in blocks_replace', '("single_block", i) in blocks_replace', "self.final_layer(")
    _has(flux_math.attention, "optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask, "
         "transformer_options=transformer_options)")
    # Sharded text (SequenceParallel.shard_text): post_input's txt / txt_ids are read back, the mask comes
    # from the DIFFUSION_MODEL kwargs (seen by our wrapper), the final slice uses the (local) text length.
    _has(Flux.forward_orig, 'txt = out["txt"]', 'txt_ids = out["txt_ids"]', "img = img[:, txt.shape[1] :, ...]")
    _has(Flux._forward, 'attn_mask=kwargs.get("attention_mask", None)')


# --- SD3 / MMDiT ----------------------------------------------------------------------------------------


def test_mmdit_hooks(comfy_root: str) -> None:
    from comfy.ldm.modules.diffusionmodules import mmdit

    _has(mmdit._block_mixing, "optimized_attention(", "transformer_options=transformer_options")
    _has(mmdit.MMDiT.forward_core_with_concat, '("double_block", i) in blocks_replace',
         '{"img": x, "txt": context, "vec": c_mod, "transformer_options": transformer_options}',
         'context = out["txt"]',  # the sharded context of block 0's replace flows into the next blocks
         "self.final_layer(")
    assert hasattr(mmdit.MMDiT, "forward_core_with_concat")


# --- SDXL (CFG only) ------------------------------------------------------------------------------------


def test_sdxl_runs_through_calc_cond_batch(comfy_root: str) -> None:
    """SDXL's CFG parallel needs nothing of the UNet: its model goes through the generic sampler path."""
    import comfy.model_base
    import comfy.samplers

    assert issubclass(comfy.model_base.SDXL, comfy.model_base.BaseModel)
    _has(comfy.samplers.calc_cond_batch, "_calc_cond_batch_outer")


# --- PixArt ---------------------------------------------------------------------------------------------


def test_pixart_object_patch_targets(comfy_root: str) -> None:
    """``models/pixart.py`` patches ``blocks.{i}.forward`` (first / last) and ``blocks.{i}.attn.forward``
    and re-does AttentionKVCompress's projections: pin the attribute names and the forward it mirrors."""
    from comfy.ldm.pixart import blocks, pixartms

    _has(pixartms.PixArtMS.__init__, "self.blocks = nn.ModuleList(", "self.final_layer = ")
    _has(pixartms.PixArtMS.forward_orig, "x = self.x_embedder(x) + pos_embed", "for block in self.blocks:",
         "x = block(x, y, t0, y_lens, (H, W), **kwargs)", "x = self.final_layer(x, t)")
    _has(pixartms.PixArtMSBlock.__init__, "self.attn = AttentionKVCompress(", "self.cross_attn = MultiHeadCrossAttention(")
    assert _params(pixartms.PixArtMSBlock.forward)[1:3] == ["x", "y"]
    assert _params(blocks.AttentionKVCompress.forward)[1:] == ["x", "mask", "HW", "block_id"]
    _has(blocks.AttentionKVCompress.forward,
         "qkv = self.qkv(x).reshape(B, N, 3, C)", "q, k, v = qkv.unbind(2)", "q = self.q_norm(q)", "k = self.k_norm(k)",
         "if self.sr_ratio > 1:", "q = q.reshape(B, N, self.num_heads, C // self.num_heads)",
         "q, k, v = map(lambda t: t.transpose(1, 2), (q, k, v),)",
         "x = optimized_attention(q, k, v, self.num_heads, mask=None, skip_reshape=True)",
         "x = x.view(B, N, C)", "x = self.proj(x)")
    _has(blocks.AttentionKVCompress.__init__, "self.sr_ratio = sr_ratio")
    _has(blocks.MultiHeadCrossAttention.forward, "q = self.q_linear(x)", "kv = self.kv_linear(cond)")
    assert callable(blocks.optimized_attention)


# --- HunyuanDiT -----------------------------------------------------------------------------------------


def test_hunyuan_dit_hooks(comfy_root: str) -> None:
    """``models/hunyuan_dit.py``: a dit double_block replace on every block (args img/txt/vec/pe/skip, pe
    the full-image RoPE) and an object patch on ``blocks.{i}.attn1.forward`` mirroring ``Attention``."""
    from comfy.ldm.hydit import attn_layers, models

    _has(models.HunYuanDiT.forward, "freqs_cis_img = calc_rope(x, self.patch_size",
         'if ("double_block", layer) in blocks_replace:',
         'block(args["img"], args["vec"], args["txt"], args["pe"], args["skip"])',
         '{"img": x, "txt": text_states, "vec": c, "pe": freqs_cis_img, "skip": skip}',
         "skips.append(x)", "x = self.final_layer(x, c)")
    _has(models.HunYuanDiTBlock.__init__, "self.attn1 = Attention(", "self.attn2 = CrossAttention(")
    _has(models.HunYuanDiTBlock._forward, "x = x + self.attn1(*attn_inputs)[0]", "x = x + self.attn2(*cross_inputs)[0]")
    assert _params(attn_layers.Attention.forward)[1:] == ["x", "freqs_cis_img"]
    _has(attn_layers.Attention.forward,
         "qkv = self.Wqkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)",
         "q, k, v = qkv.unbind(0)", "q = self.q_norm(q)", "k = self.k_norm(k)",
         "apply_rotary_emb(q, k, freqs_cis_img, head_first=True)",
         "x = optimized_attention(q, k, v, self.num_heads, skip_reshape=True, attn_precision=self.attn_precision)",
         "x = self.out_proj(x)", "x = self.proj_drop(x)", "out_tuple = (x,)")
    _has(attn_layers.CrossAttention.forward, "apply_rotary_emb(q, None, freqs_cis_img)")  # query-local RoPE
    assert _params(attn_layers.apply_rotary_emb)[:4] == ["xq", "xk", "freqs_cis", "head_first"]
    assert callable(attn_layers.optimized_attention)


# --- the pack's one global hook (patching.py) -----------------------------------------------------------


def test_prompt_queue_set_flag(comfy_root: str) -> None:
    """``install_free_hook`` wraps ``execution.PromptQueue.set_flag(self, name, data)``, which ``POST /free``
    calls with "unload_models" / "free_memory"."""
    execution = _symbol("execution:PromptQueue")
    assert _params(execution.set_flag) == ["self", "name", "data"]
    server = importlib.import_module("server")
    _has(server.PromptServer, 'self.prompt_queue.set_flag("unload_models", unload_models)',
         'self.prompt_queue.set_flag("free_memory", free_memory)')


# --- ControlNet residuals under sequence parallel (parallel/control.py) ------------------------------------


def test_control_residuals_are_indexed_per_block_and_added_to_the_stream(comfy_root: str) -> None:
    """parallel/control.py hands out each residual (``control["input"|"output"][i]``) as the local rows:
    that is exact only while ComfyUI reads them per block by index and adds them to the image stream."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules import mmdit

    _has(Flux.forward_orig, 'control_i = control.get("input")', "add = control_i[i]",
         "img[:, :add.shape[1]] += add", 'control_o = control.get("output")', "add = control_o[i]",
         "img[:, txt.shape[1] : txt.shape[1] + add.shape[1], ...] += add")
    _has(mmdit.MMDiT.forward_core_with_concat, 'control_o = control.get("output")', "add = control_o[i]",
         "x += add")


# --- the parallel VAE (engine/vae.py + parallel/tiles.py) ---------------------------------------------------


def test_vae_two_d_tilers_and_their_callers(comfy_root: str) -> None:
    """``XDiTVAE`` overrides ``decode_tiled_`` / ``encode_tiled_`` (same signatures and defaults) and runs
    them with ``first_stage_model`` swapped on the instance: exact only while the per-tile call reads
    ``self.first_stage_model.<decode|encode>`` at call time, and while every tiled entry point (and the
    out-of-memory fallback of ``decode`` / ``encode``) goes through these two methods."""
    import comfy.sd

    vae = comfy.sd.VAE
    for fn, first, defaults in ((vae.decode_tiled_, "samples", (64, 64, 16)),
                                (vae.encode_tiled_, "pixel_samples", (512, 512, 64))):
        sig = inspect.signature(fn)
        assert list(sig.parameters) == ["self", first, "tile_x", "tile_y", "overlap"], fn.__qualname__
        assert tuple(p.default for p in list(sig.parameters.values())[2:]) == defaults, fn.__qualname__
    assert _params(vae.decode) == ["self", "samples_in", "vae_options"]
    assert _params(vae.encode) == ["self", "pixel_samples"]
    for fn in (vae.decode_tiled, vae.encode_tiled):
        assert _params(fn)[2:] == ["tile_x", "tile_y", "overlap", "tile_t", "overlap_t"]
    _has(vae.decode_tiled_,
         "decode_fn = lambda a: self.first_stage_model.decode(a.to(self.vae_dtype).to(self.device)).float()",
         "comfy.utils.tiled_scale(samples, decode_fn, tile_x // 2, tile_y * 2, overlap, "
         "upscale_amount = self.upscale_ratio, output_device=self.output_device, pbar = pbar)")
    _has(vae.encode_tiled_,
         "encode_fn = lambda a: self.first_stage_model.encode((self.process_input(a))"
         ".to(self.vae_dtype).to(self.device)).float()",
         "comfy.utils.tiled_scale(pixel_samples, encode_fn, tile_x, tile_y, overlap, "
         "upscale_amount = (1/self.downscale_ratio), out_channels=self.latent_channels")
    _has(vae.decode, "except model_management.OOM_EXCEPTION:", "pixel_samples = self.decode_tiled_(samples_in)")
    _has(vae.encode, "except model_management.OOM_EXCEPTION:", "samples = self.encode_tiled_(pixel_samples)")
    _has(vae.decode_tiled, "output = self.decode_tiled_(samples, **args)", "return output.movedim(1, -1)")
    _has(vae.encode_tiled, "samples = self.encode_tiled_(pixel_samples, **args)")


def test_tiled_scale_calls_and_blends_tiles_in_order(comfy_root: str) -> None:
    """``run_tiled`` replays outputs in the order of the rehearsal and gives placeholders of
    ``round(get_scale(size))``: ComfyUI's tiler must call ``function`` in a fixed order, size its output
    that way, and blend each tile by the shape of what ``function`` returned."""
    import comfy.utils

    tsm = comfy.utils.tiled_scale_multidim
    assert _params(tsm) == ["samples", "function", "tile", "overlap", "upscale_amount", "out_channels",
                            "output_device", "downscale", "index_formulas", "pbar"]
    _has(tsm, "out.append(round(get_scale(i, a[i])))", "output[b:b+1] = function(s).to(output_device)",
         "for it in itertools.product(*positions):", "ps = function(s_in).to(output_device)",
         "mask = torch.ones_like(ps)", "o = o.narrow(d + 2, upscaled[d], mask.shape[d + 2])")
    _has(comfy.utils.tiled_scale, "return tiled_scale_multidim(samples, function, (tile_y, tile_x)")


def test_progress_bar_reads_the_global_hook_when_made(comfy_root: str) -> None:
    """The rehearsal mutes its progress bar by setting ``comfy.utils.PROGRESS_BAR_HOOK`` to None while the
    tiler makes its ``ProgressBar``."""
    import comfy.utils

    assert hasattr(comfy.utils, "PROGRESS_BAR_HOOK")
    _has(comfy.utils.ProgressBar.__init__, "self.hook = PROGRESS_BAR_HOOK")
    _has(comfy.utils.ProgressBar.update_absolute, "if self.hook is not None:")
