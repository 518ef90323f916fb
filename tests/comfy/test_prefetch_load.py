"""A model loaded through the prefetch equals the one ComfyUI's file loader gives, parameter for parameter
and in the latent it samples (real ComfyUI host, CPU device).

``Worker.load_model`` with a ``Prefetch`` read into CPU memory hands ComfyUI's own state-dict loader
(``load_diffusion_model_state_dict`` / ``load_state_dict_guess_config``) the prefetched tensors; the
reference is ``comfy_runtime.load_diffusion_model`` (``comfy.sd.load_diffusion_model`` /
``load_checkpoint_guess_config`` on the file). Both loader kinds: the tiny SD3 file as a diffusion model,
and the same weights under ``model.diffusion_model.`` as a checkpoint.
"""

from __future__ import annotations

import pytest

from xdit_multigpu.config import LoaderKind, LoadSpec

pytestmark = pytest.mark.comfy


def _sample(patcher, tiny, seed=3):
    import comfy.sample

    from xdit_multigpu.testing import tiny_models as tm

    latent = comfy.sample.fix_empty_latent_channels(patcher, tm.empty_latent(tiny, 128, 128)["samples"])
    noise = comfy.sample.prepare_noise(latent, seed)
    pos = tm.conditioning_for(tiny, seed=1, width=128, height=128)
    neg = tm.conditioning_for(tiny, seed=2, width=128, height=128)
    return comfy.sample.sample(patcher, noise, 2, 2.0, "euler", "simple", pos, neg, latent, seed=seed,
                               disable_pbar=True)


def _checkpoint(path: str, out: str) -> str:
    """The diffusion model of ``path`` as a checkpoint file (``model.diffusion_model.`` keys, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        sd = {"model.diffusion_model." + k: f.get_tensor(k) for k in f.keys()}
    save_file(sd, out, metadata={"modelspec.title": "tiny sd3 checkpoint"})
    return out


@pytest.mark.parametrize("kind", [LoaderKind.DIFFUSION_MODEL, LoaderKind.CHECKPOINT])
def test_prefetched_load_equals_comfyuis_file_loader(tiny_models, tmp_path, kind):
    import torch

    from xdit_multigpu.worker import comfy_runtime
    from xdit_multigpu.worker.prefetch import Prefetch
    from xdit_multigpu.worker.worker import Worker

    tiny = tiny_models["sd3"]
    path = tiny.path
    if kind is LoaderKind.CHECKPOINT:
        path = _checkpoint(tiny.path, str(tmp_path / "ckpt.safetensors"))
    load = LoadSpec.for_file(kind, path)
    reference = comfy_runtime.load_diffusion_model(load)

    worker = Worker()
    prefetch = worker._prefetch = Prefetch.start(path, "cpu", chunk_bytes=1 << 20)  # chunks smaller than tensors
    facts = worker.load_model(load)
    assert facts["prefetch_used"] is True, facts
    assert facts["prefetch_buffer_freed"] is True and facts["prefetch_aliases_copied"] == 0
    assert not prefetch.buffer_alive()  # nothing in ComfyUI kept the prefetched tensors
    assert facts["config_class"] == type(reference.model.model_config).__name__ == "SD3"

    got, ref = worker.patcher.model.state_dict(), reference.model.state_dict()
    assert list(got) == list(ref)
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    assert worker.patcher.model.get_dtype() == reference.model.get_dtype()
    assert torch.equal(_sample(worker.patcher, tiny), _sample(reference, tiny))
    worker.free()
