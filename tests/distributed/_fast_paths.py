"""Rank entry points of ``test_parallel_fast_paths.py`` (spawned ranks import them from here)."""

from __future__ import annotations

from typing import Any


def _attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **_):
    """ComfyUI's backend contract in plain torch (the ``func`` the override receives)."""
    import torch

    if not skip_reshape:
        b, s, _ = q.shape
        q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads if t.ndim == 3 else t.shape[-1]).transpose(1, 2)
                   for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)


def fused_rank(rank: int, world: int, chunks: tuple[int, ...] | None) -> dict[str, Any]:
    """``FusedUlysses`` with each of ``chunks`` (head chunks per call) vs full attention, both layouts."""
    import torch
    import torch.distributed as dist

    from xdit_multigpu.parallel.ulysses import FusedUlysses

    gen = torch.Generator().manual_seed(5)
    b, h, s, d = 2, 12, 6 * world, 8
    q, k, v = (torch.randn(b, h, s, d, generator=gen) for _ in range(3))
    ref = _attention(q, k, v, h, skip_reshape=True, skip_output_reshape=True)
    rows = slice(rank * 6, rank * 6 + 6)
    out: dict[str, Any] = {}
    local = [t[:, :, rows] for t in (q, k, v)]
    flat = [t.transpose(1, 2).reshape(b, s, h * d)[:, rows] for t in (q, k, v)]
    for c in chunks or (0,):
        fused = FusedUlysses(dist.group.WORLD, world, c)
        got = fused(_attention, *local, h, True, True, {})
        got2 = fused(_attention, *flat, h, False, False, {})
        out[c] = {"bhsd": float((got - ref[:, :, rows]).abs().max()),
                  "bsd": float((got2 - ref.transpose(1, 2).reshape(b, s, h * d)[:, rows]).abs().max()),
                  "calls": fused.calls, "chunks": fused.last_chunks, "bhsd_out": got.numpy(), "bsd_out": got2.numpy()}
    return out


SWITCHES = ({}, {"XDIT_SHARD_TEXT": "0"}, {"XDIT_FUSED_ULYSSES": "0"})
PLANS = ((1, 2, 1), (1, 1, 2))


def model_rank(rank: int, world: int, payload: tuple[str, list[tuple[tuple[int, int, int], dict[str, str]]]]) -> dict[str, Any]:
    import os

    import comfy.sample
    import torch

    from _cases import LATENT_CHANNELS, _cond, build_model
    from _harness import groups_for
    from xdit_multigpu.config import ParallelPlan
    from xdit_multigpu.models import lookup_config
    from xdit_multigpu.parallel import sequence, ulysses
    from xdit_multigpu.parallel.apply import parallelize

    name, runs = payload
    sharded: list[int] = []
    original = sequence.SequenceParallel.shard_text

    def counting(self, state, text, dim=1):  # records whether this forward's text was sharded
        out = original(self, state, text, dim)
        sharded.append(int(state.text_sharded))
        return out

    sequence.SequenceParallel.shard_text = counting  # type: ignore[method-assign]
    calls: list[int] = []
    real_call = ulysses.FusedUlysses.__call__

    def counted(self, *a, **kw):
        calls.append(1)
        return real_call(self, *a, **kw)

    ulysses.FusedUlysses.__call__ = counted  # type: ignore[method-assign]
    base = build_model(name)
    spec = lookup_config(base.model.model_config)
    text = 8 if name == "flux" else 7  # SD3 prepends 1 register token: 8 context rows
    gen = torch.Generator().manual_seed(3)
    pos, neg = [_cond(name, gen, text, 16)], [_cond(name, gen, text, 16)]
    latent = comfy.sample.fix_empty_latent_channels(base, torch.zeros(1, LATENT_CHANNELS[name], 16, 16))
    noise = comfy.sample.prepare_noise(latent, 42)

    def sample(patcher: Any) -> Any:
        with torch.inference_mode():
            return comfy.sample.sample(patcher, noise, 2, 2.5, "euler", "simple", pos, neg, latent, seed=42,
                                       disable_pbar=True).numpy()

    out: dict[str, Any] = {"runs": []}
    groups = None
    for plan_t, env in runs:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            groups = groups_for(ParallelPlan(*plan_t), groups, rank, world)
            sharded.clear(), calls.clear()
            latent_out = sample(parallelize(base, spec, ParallelPlan(*plan_t), groups))
        finally:
            for k, val in saved.items():
                os.environ.pop(k) if val is None else os.environ.__setitem__(k, val)
        out["runs"].append({"latent": latent_out, "sharded": sum(sharded), "forwards": len(sharded),
                            "fused": len(calls)})
    if rank == 0:
        out["reference"] = sample(base)
    return out


