"""Pins of the ComfyUI symbols, signatures and call sites the Chroma and Qwen-Image hooks rely on
(``models/chroma.py``, ``models/qwen_image.py``, ``models/joint_rope.py``).

Same helpers as ``test_host_pins.py`` (whitespace-insensitive source checks, in order): a ComfyUI update
that moves one of these fails here, with the symbol named, instead of running the model unsharded or
splitting it wrongly.
"""

from __future__ import annotations

import inspect

import pytest

from tests.comfy.test_host_pins import _has, _params

pytestmark = pytest.mark.comfy


def test_joint_rope_table_layout(comfy_root: str) -> None:
    """``joint_rope`` cuts the table along dim 2: ``EmbedND`` returns ``(B, 1, S, D/2, 2, 2)`` (the
    ``unsqueeze(1)`` after concatenating the axes on dim -3), and both families build it once from
    ``cat(txt_ids, img_ids)`` -- text rows first."""
    import torch
    from comfy.ldm.flux.layers import EmbedND

    _has(EmbedND.forward, "dim=-3", "return emb.unsqueeze(1)")
    ids = torch.zeros(2, 7, 3)
    assert EmbedND(dim=32, theta=10000, axes_dim=[8, 12, 12])(ids).shape == (2, 1, 7, 16, 2, 2)


# --- Chroma ---------------------------------------------------------------------------------------------


def test_chroma_hooks(comfy_root: str) -> None:
    """Block replaces on every double / single block receive ``pe`` for the full ``[txt | img]`` sequence
    and ``transformer_options``; the single stream is ``cat(txt, img)``; ``final_layer`` runs after
    ``img[:, txt.shape[1]:]`` (so the gather must come before it)."""
    from comfy.ldm.chroma.model import Chroma

    _has(Chroma.forward, "WrappersMP.DIFFUSION_MODEL")
    _has(Chroma.forward_orig,
         "ids = torch.cat((txt_ids, img_ids), dim=1)", "pe = self.pe_embedder(ids)",
         'blocks_replace = patches_replace.get("dit", {})',
         "for i, block in enumerate(self.double_blocks):", "if i not in self.skip_mmdit:",
         'if ("double_block", i) in blocks_replace:',
         '{"img": img, "txt": txt, "vec": double_mod, "pe": pe, "attn_mask": attn_mask, '
         '"transformer_options": transformer_options}',
         'txt = out["txt"]', 'img = out["img"]',
         "img = torch.cat((txt, img), 1)",
         "for i, block in enumerate(self.single_blocks):", "if i not in self.skip_dit:",
         'if ("single_block", i) in blocks_replace:',
         '{"img": img, "vec": single_mod, "pe": pe, "attn_mask": attn_mask, '
         '"transformer_options": transformer_options}',
         'img = out["img"]',
         "img = img[:, txt.shape[1] :, ...]", "img = self.final_layer(img, vec=final_mod)")
    # Modulation is per sample (no per-token split), from the approximator.
    _has(Chroma.get_modulations, 'return (tensor[:, -2:-1, :], tensor[:, -1:, :])')


def test_chroma_radiance_runs_chromas_transformer(comfy_root: str) -> None:
    """Chroma Radiance is driven by the Chroma hooks: it inherits ``forward_orig`` and the DIFFUSION_MODEL
    forward, and its NeRF head reads the transformer output after ``forward_orig`` returns (gathered)."""
    from comfy.ldm.chroma.model import Chroma
    from comfy.ldm.chroma_radiance.model import ChromaRadiance

    assert issubclass(ChromaRadiance, Chroma)
    assert ChromaRadiance.forward_orig is Chroma.forward_orig and ChromaRadiance.forward is Chroma.forward
    _has(ChromaRadiance._forward, "img_out = self.forward_orig(", "return self.forward_nerf(img, img_out, params)")
    _has(ChromaRadiance.img_in, "img = self.img_in_patch(img)", "return img.flatten(2).transpose(1, 2)")


def test_chroma_blocks_are_flux_blocks(comfy_root: str) -> None:
    """Chroma's blocks are Flux's: joint attention through ``flux.math.attention`` with the options,
    ``[txt | img]`` order unless ``flipped_img_txt`` (refused by the installer)."""
    from comfy.ldm.chroma import model as chroma
    from comfy.ldm.flux import layers, math as flux_math

    assert chroma.DoubleStreamBlock is layers.DoubleStreamBlock and chroma.SingleStreamBlock is layers.SingleStreamBlock
    assert inspect.signature(layers.DoubleStreamBlock.__init__).parameters["flipped_img_txt"].default is False
    _has(layers.DoubleStreamBlock.forward, "q = torch.cat((txt_q, img_q), dim=2)",
         "attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)",
         "txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]")
    _has(layers.SingleStreamBlock.forward,
         "attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)")
    _has(flux_math.attention, "q, k = apply_rope(q, k, pe)",
         "optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=transformer_options)")


# --- Qwen-Image -----------------------------------------------------------------------------------------


def test_qwen_image_hooks(comfy_root: str) -> None:
    """One double_block replace per block (args img / txt / vec / pe / transformer_options), the RoPE table
    of ``cat(txt_ids, img_ids)`` built once, reference latents appended to the image stream before the
    blocks and trimmed (``[:, :num_embeds]``) after the final layer, ``temb`` per sample."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel as Qwen

    _has(Qwen.forward, "WrappersMP.DIFFUSION_MODEL")
    _has(Qwen._forward,
         "hidden_states, img_ids, orig_shape = self.process_img(x)", "num_embeds = hidden_states.shape[1]",
         "hidden_states = torch.cat([hidden_states, kontext], dim=1)",
         "img_ids = torch.cat([img_ids, kontext_ids], dim=1)",
         "ids = torch.cat((txt_ids, img_ids), dim=1)", "image_rotary_emb = self.pe_embedder(ids)",
         "self.time_text_embed(timestep, hidden_states)",
         'if ("double_block", i) in blocks_replace:',
         '{"img": hidden_states, "txt": encoder_hidden_states, "vec": temb, "pe": image_rotary_emb, '
         '"transformer_options": transformer_options}',
         'hidden_states = out["img"]', 'encoder_hidden_states = out["txt"]',
         'if "double_block" in patches:',  # refused by the installer while sharded
         'hidden_states[:, :add.shape[1]] += add',
         "hidden_states = self.norm_out(hidden_states, temb)", "hidden_states[:, :num_embeds]")


def test_qwen_image_block_signature_and_modulation(comfy_root: str) -> None:
    """``models/qwen_image.py`` refuses blocks whose forward takes other arguments than ``BLOCK_PARAMS``
    (a per-token modulation split at a token index, as later ComfyUI versions add, would be applied at a
    global index to local rows). Here: the pinned signature, and ``_modulate`` broadcasting one
    per-sample ``temb`` over every token."""
    from comfy.ldm.qwen_image import model as qwen

    from xdit_multigpu.models.qwen_image import BLOCK_PARAMS

    assert tuple(_params(qwen.QwenImageTransformerBlock.forward)[1:]) == BLOCK_PARAMS
    assert _params(qwen.QwenImageTransformerBlock._modulate)[1:] == ["x", "mod_params"]
    _has(qwen.QwenImageTransformerBlock._modulate, "shift, scale, gate = torch.chunk(mod_params, 3, dim=-1)",
         "torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1)), gate.unsqueeze(1)")
    _has(qwen.QwenImageTransformerBlock.forward, "img_mod_params = self.img_mod(temb)",
         "transformer_options=transformer_options", "return encoder_hidden_states, hidden_states")


def test_qwen_image_attention(comfy_root: str) -> None:
    """Joint ``[txt | img]`` attention through the override (``skip_reshape=True``), RoPE on both
    streams from the one table; the text mask is not passed to the attention."""
    from comfy.ldm.qwen_image import model as qwen

    _has(qwen.Attention.forward, "joint_query = torch.cat([txt_query, img_query], dim=2)",
         "joint_query = apply_rope1(joint_query, image_rotary_emb)",
         "optimized_attention_masked(joint_query, joint_key, joint_value, self.heads, attention_mask, "
         "transformer_options=transformer_options, skip_reshape=True)",
         "txt_attn_output = joint_hidden_states[:, :seq_txt, :]")
    _has(qwen.QwenImageTransformerBlock.forward, "encoder_hidden_states_mask=encoder_hidden_states_mask",
         "image_rotary_emb=image_rotary_emb")
    import comfy.ldm.modules.attention as attention

    assert qwen.optimized_attention_masked is attention.optimized_attention_masked


def test_qwen_image_controlnet_residuals(comfy_root: str) -> None:
    """``control_residuals=True`` for Qwen-Image (parallel/control.py hands out local rows): the InstantX
    ControlNet returns one residual per main-model block under ``"input"``, each over the image tokens
    of ``x`` only (no reference latents), computed from full-length inputs; the main model adds
    ``control["input"][i]`` to the first ``add.shape[1]`` rows after block i."""
    from comfy.ldm.qwen_image import controlnet
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel as Qwen

    _has(controlnet.QwenImageControlNetModel.forward, "hidden_states, img_ids, orig_shape = self.process_img(x)",
         "hidden_states = self.img_in(hidden_states) + self.controlnet_x_embedder(hint)",
         "controlnet_block_samples = controlnet_block_samples + (self.controlnet_blocks[i](hidden_states),) * repeat",
         'return {"input": controlnet_block_samples[:self.main_model_double]}')
    _has(Qwen._forward, 'control_i = control.get("input")', "if i < len(control_i):", "add = control_i[i]",
         "hidden_states[:, :add.shape[1]] += add")


def test_qwen_image_installer_refuses_a_changed_block(comfy_root: str) -> None:
    """The refusal itself: a block forward with an extra argument is not split."""
    from comfy.ldm.qwen_image import model as qwen

    from xdit_multigpu.errors import UnsupportedModelError
    from xdit_multigpu.models.qwen_image import _check_layout

    class Block(qwen.QwenImageTransformerBlock):
        def forward(self, hidden_states, encoder_hidden_states,  # type: ignore[override]
                    encoder_hidden_states_mask, temb,
                    image_rotary_emb=None, timestep_zero_index=None, transformer_options={}):
            raise AssertionError("not called")

    class Model:
        transformer_blocks = [Block.__new__(Block)]

    with pytest.raises(UnsupportedModelError, match="timestep_zero_index") as err:
        _check_layout(Model())
    assert err.value.field == "parallel_strategy" and "CFG parallel" in str(err.value)
