"""The benchmark's text encode (``bench.text``): real-size encoders ComfyUI's own loader recognises.

The GPU benchmark times ``CLIPTextEncode`` with random-weight CLIP-L / CLIP-G / T5-XXL for the 28-step
image. Here: the state dicts it builds carry the keys and shapes ComfyUI's ``detect_te_model`` maps to
those encoders (on ``meta``: T5-XXL is 4.8 B parameters), and the whole path (ComfyUI's text-encoder
loader, tokenizer, ``encode_from_tokens_scheduled``) runs on CPU for SDXL's CLIP-L + CLIP-G.
"""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.comfy


@pytest.mark.parametrize(("encoder", "te_model", "params_b"), [
    ("clip_l", "CLIP_L", 0.12), ("clip_g", "CLIP_G", 0.69), ("t5xxl", "T5_XXL", 4.76)])
def test_state_dicts_are_the_encoders_comfyui_detects(comfy_root, encoder, te_model, params_b):
    import comfy.sd

    from xdit_multigpu.bench.text import meta_state_dict

    sd = meta_state_dict(encoder)
    assert comfy.sd.detect_te_model(sd) is getattr(comfy.sd.TEModel, te_model)
    assert sum(t.numel() for t in sd.values()) / 1e9 == pytest.approx(params_b, abs=0.01)


def test_every_benchmark_model_names_known_encoders_and_clip_types(comfy_root):
    import comfy.sd

    from xdit_multigpu.bench.realsize import ARCHS
    from xdit_multigpu.bench.text import ENCODERS

    for model, (clip_type, encoders) in ENCODERS.items():
        assert model in ARCHS and hasattr(comfy.sd.CLIPType, clip_type), model
        assert set(encoders) <= {"clip_l", "clip_g", "t5xxl"}, model


def test_sdxl_encode_runs_comfyuis_loader_and_encoder_on_cpu(comfy_root, caplog):
    from xdit_multigpu.bench.text import encode_s

    with caplog.at_level(logging.WARNING):
        out = encode_s("sdxl", cuda=False, repeats=1)
    assert not [r for r in caplog.records if "clip missing" in r.getMessage()]  # every weight was loaded
    assert out["text_encoders"] == ["clip_l", "clip_g"] and out["text_encode_output"] == [1, 77, 2048]
    assert out["text_encode_s"] > 0


def test_models_without_real_encoders_say_why(comfy_root):
    from xdit_multigpu.bench.text import encode_s

    out = encode_s("tiny-flux", cuda=False)
    assert out["text_encode_s"] is None and "tiny-flux" in out["text_encode_note"]
