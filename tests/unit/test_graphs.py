"""CUDA-graph wrapper logic without ComfyUI or a GPU: call signatures, rebuild, what counts as foreign
code, and the eager -> capture -> replay sequence (CPU stand-in backend)."""

from __future__ import annotations

import functools
import types

import pytest

torch = pytest.importorskip("torch")

from xdit_multigpu.config import CudaGraphs  # noqa: E402
from xdit_multigpu.errors import ConfigError  # noqa: E402
from xdit_multigpu.testing.graph_backend import ReplayBackend  # noqa: E402
from xdit_multigpu.worker import graphs  # noqa: E402
from xdit_multigpu.worker.graphs import (  # noqa: E402
    GraphedApplyModel,
    WarmShapes,
    flatten,
    foreign_code,
    foreign_object_patches,
    is_ours,
    rebuild,
    shape_of,
)

pytestmark = pytest.mark.unit


def _sig(obj, device_type="cpu"):
    tensors, sig = [], []
    flatten(obj, tensors, sig, device_type)
    return tensors, tuple(sig)


def test_signature_ignores_values_but_not_structure():
    a = {"x": torch.zeros(2, 3), "opts": {"cond_or_uncond": [0, 1], "n": 2.5}}
    b = {"x": torch.ones(2, 3), "opts": {"cond_or_uncond": [0, 1], "n": 2.5}}
    assert _sig(a)[1] == _sig(b)[1]
    for other in ({"x": torch.zeros(3, 2), "opts": a["opts"]},  # shape
                  {"x": torch.zeros(2, 3, dtype=torch.float64), "opts": a["opts"]},  # dtype
                  {"x": torch.zeros(3, 2).t(), "opts": a["opts"]},  # strides
                  {"x": a["x"], "opts": {"cond_or_uncond": [1, 0], "n": 2.5}},  # a number in a list
                  {"x": a["x"], "opts": {"cond_or_uncond": [0, 1], "n": 3.0}},  # a float
                  {"opts": a["opts"], "x": a["x"]}):  # key order
        assert _sig(other)[1] != _sig(a)[1]


def test_objects_by_identity_and_other_device_tensors_as_constants():
    f, g = (lambda: 1), (lambda: 1)
    assert _sig([f])[1] == _sig([f])[1] != _sig([g])[1]
    # On the "cuda" graph device, CPU tensors are constants: small ones by value.
    t1, s1 = _sig([torch.tensor([1.0, 2.0])], "cuda")
    _, s2 = _sig([torch.tensor([1.0, 3.0])], "cuda")
    assert t1 == [] and s1 != s2
    big = torch.zeros(100)
    assert _sig([big], "cuda")[1] != _sig([big.clone()], "cuda")[1]  # large: identity


def test_rebuild_puts_tensors_back_in_flatten_order():
    marker = object()
    obj = ({"a": torch.zeros(1), "b": [torch.ones(2), marker, (torch.full((3,), 2.0), 7)]}, "s")
    tensors, _ = _sig(obj)
    fresh = [t + 10 for t in tensors]
    out = rebuild(obj, iter(fresh), "cpu")
    assert out[0]["a"] is fresh[0] and out[0]["b"][0] is fresh[1] and out[0]["b"][2][0] is fresh[2]
    assert out[0]["b"][1] is marker and out[0]["b"][2][1] == 7 and out[1] == "s"
    assert out[0] is not obj[0] and out[0]["b"] is not obj[0]["b"]  # containers are new (the model may write into them)


def test_is_ours():
    class Local:
        def __call__(self):
            return None

    assert is_ours(graphs.flatten) and is_ours(functools.partial(graphs.flatten, 1))
    assert is_ours(types.MethodType(graphs.flatten, object())) and is_ours(GraphedApplyModel(CudaGraphs.AUTO))
    assert not is_ours(lambda: None) and not is_ours(Local()) and not is_ours(torch.add)


def test_foreign_code_and_object_patches():
    mine = {"patches_replace": {"dit": {("double_block", 0): graphs.flatten}},
            "wrappers": {"apply_model": {"k": [GraphedApplyModel(CudaGraphs.AUTO)]}}, "sigmas": torch.zeros(1)}
    assert foreign_code(mine) is None
    theirs = dict(mine, patches={"attn1_patch": [lambda *a: a]})
    assert "patches" in foreign_code(theirs)
    assert "optimized_attention_override" in foreign_code({"optimized_attention_override": lambda *a: a})
    assert foreign_object_patches({"model_sampling": object()}) is None
    assert "diffusion_model.x" in foreign_object_patches({"diffusion_model.x": lambda: None})


class _Exec:
    """Stands in for ComfyUI's WrapperExecutor: counts real calls, computes x * t + context.sum()."""

    def __init__(self, lowvram=False):
        self.calls = 0
        self.class_obj = types.SimpleNamespace(model_lowvram=lowvram)

    def __call__(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        self.calls += 1
        return x * t.view(-1, 1) + c_crossattn.sum()


def _call(wrapper, ex, x, t, ctx, control=None, options=None):
    return wrapper(ex, x, t, None, ctx, control, options if options is not None else {})


def test_eager_then_capture_then_replay_with_fresh_values():
    ex, backend = _Exec(), ReplayBackend()
    w = GraphedApplyModel(CudaGraphs.AUTO, backend)
    for i in range(5):
        x, t, ctx = torch.randn(2, 4), torch.rand(2), torch.randn(3, 5)
        assert torch.equal(_call(w, ex, x, t, ctx), x * t.view(-1, 1) + ctx.sum())
    assert (w.stats.eager, w.stats.captured, w.stats.replayed, backend.captures) == (1, 1, 3, 1)
    # A new signature (batch 1) gets its own warm-up and capture.
    for _ in range(3):
        _call(w, ex, torch.randn(1, 4), torch.rand(1), torch.randn(3, 5))
    assert (w.stats.eager, w.stats.captured, w.stats.replayed) == (2, 2, 4)


def test_replay_returns_a_copy():
    w = GraphedApplyModel(CudaGraphs.AUTO, ReplayBackend())
    outs = [_call(w, _Exec(), torch.full((1, 2), float(i)), torch.ones(1), torch.zeros(1)) for i in range(4)]
    assert [o[0, 0].item() for o in outs] == [0.0, 1.0, 2.0, 3.0]  # earlier results not overwritten


def test_capture_failure_keeps_that_signature_eager():
    class Failing(ReplayBackend):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    ex = _Exec()
    w = GraphedApplyModel(CudaGraphs.AUTO, Failing())
    for _ in range(4):
        x = torch.randn(2, 4)
        assert torch.equal(_call(w, ex, x, torch.ones(2), torch.zeros(1)), x)
    assert (w.stats.eager, w.stats.captured, w.stats.replayed, ex.calls) == (4, 0, 0, 4)
    assert "not permitted" in w.stats.failed[0]


def test_eager_reasons():
    ctx = torch.zeros(1)
    w = GraphedApplyModel(CudaGraphs.AUTO, ReplayBackend())
    _call(w, _Exec(), torch.zeros(1, 2), torch.ones(1), ctx, control={"output": []})
    assert "ControlNet" in w.stats.off_reason
    w = GraphedApplyModel(CudaGraphs.AUTO, ReplayBackend())
    _call(w, _Exec(lowvram=True), torch.zeros(1, 2), torch.ones(1), ctx)
    assert "lowvram" in w.stats.off_reason
    foreign = {"patches": {"attn1_patch": [lambda *a: a]}}
    w = GraphedApplyModel(CudaGraphs.AUTO, ReplayBackend())
    for _ in range(3):
        _call(w, _Exec(), torch.zeros(1, 2), torch.ones(1), ctx, options=foreign)
    assert "another node" in w.stats.off_reason and w.stats.captured == 0
    w = GraphedApplyModel(CudaGraphs.ON, ReplayBackend())  # the user vouches for the foreign code
    for _ in range(3):
        _call(w, _Exec(), torch.zeros(1, 2), torch.ones(1), ctx, options=foreign)
    assert w.stats.off_reason is None and w.stats.replayed == 1
    w = GraphedApplyModel(CudaGraphs.AUTO)  # real CUDA backend, CPU tensors: eager
    _call(w, _Exec(), torch.zeros(1, 2), torch.ones(1), ctx)
    assert w.stats.off_reason == "not on a cuda device"


def test_too_many_signatures_turns_graphs_off():
    w = GraphedApplyModel(CudaGraphs.AUTO, ReplayBackend(), max_graphs=2)
    for n in (1, 2, 3):
        for _ in range(2):
            _call(w, _Exec(), torch.zeros(n, 2), torch.ones(n), torch.zeros(1))
    assert w.stats.captured == 2 and "more than 2" in w.stats.off_reason


def test_env_value_is_validated(monkeypatch):
    monkeypatch.delenv("XDIT_CUDA_GRAPHS", raising=False)
    assert CudaGraphs.from_env() is CudaGraphs.AUTO
    monkeypatch.setenv("XDIT_CUDA_GRAPHS", "OFF")
    assert CudaGraphs.from_env() is CudaGraphs.OFF
    monkeypatch.setenv("XDIT_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ConfigError, match="XDIT_CUDA_GRAPHS"):
        CudaGraphs.from_env()


def test_conds_go_to_the_graph_device_up_front():
    x = torch.zeros(1, 2, device="meta")
    ctx, y, sig = torch.ones(1, 3), torch.ones(1, 4), torch.ones(1)
    options = {"sample_sigmas": sig}
    args, kwargs = graphs.inputs_to_device((x, torch.ones(1), None, ctx, None, options),
                                           {"y": y, "ref": [y], "transformer_options": options, "n": 3}, x.device)
    assert args[0] is x and args[1].is_meta and args[2] is None and args[3].is_meta and args[5] is options
    assert kwargs["y"].is_meta and kwargs["ref"][0].is_meta and kwargs["n"] == 3
    assert kwargs["transformer_options"]["sample_sigmas"] is sig  # left where it is


def test_warm_start_captures_a_known_shape_at_its_first_call_in_a_later_request():
    """A request's first call of a shape that an earlier request ran (same worker, model and groups) is
    captured at once; per-request objects in the signature (other identities) do not matter, shapes do."""
    warm, ex, backend = WarmShapes(), _Exec(), ReplayBackend()
    first = GraphedApplyModel(CudaGraphs.AUTO, backend, warm=warm)
    options = {"req": object()}  # an object of this request (a patcher clone's, say)
    for _ in range(3):
        _call(first, ex, torch.randn(2, 4), torch.rand(2), torch.randn(3, 5), options=options)
    assert (first.stats.eager, first.stats.captured, first.stats.warm_starts) == (1, 1, 0)
    second = GraphedApplyModel(CudaGraphs.AUTO, backend, warm=warm)
    options = {"req": object()}  # the next request's own object
    for _ in range(3):
        x, t, ctx = torch.randn(2, 4), torch.rand(2), torch.randn(3, 5)
        out = _call(second, ex, x, t, ctx, options=options)
        assert torch.equal(out, x * t.view(-1, 1) + ctx.sum())
    assert (second.stats.eager, second.stats.captured, second.stats.warm_starts, second.stats.replayed) == (0, 1, 1, 2)
    # A shape no request ran yet still gets its warm-up call; so does every shape without a WarmShapes.
    _call(second, ex, torch.randn(1, 4), torch.rand(1), torch.randn(3, 5))
    assert second.stats.eager == 1
    cold = GraphedApplyModel(CudaGraphs.AUTO, ReplayBackend())
    for _ in range(2):
        _call(cold, ex, torch.randn(2, 4), torch.rand(2), torch.randn(3, 5))
    assert (cold.stats.eager, cold.stats.warm_starts) == (1, 0)


def test_a_failed_warm_start_falls_back_to_warm_up_then_capture_and_is_not_tried_again():
    class FailsOnce(ReplayBackend):
        def capture(self, fn):
            if not self.captures:
                self.captures += 1
                raise RuntimeError("operation not permitted when stream is capturing")
            return super().capture(fn)

    warm, ex = WarmShapes(), _Exec()
    shape = (torch.randn(2, 4), torch.ones(2), torch.zeros(1))
    _call(GraphedApplyModel(CudaGraphs.AUTO, ReplayBackend(), warm=warm), ex, *shape)  # request 1 ran the shape
    backend = FailsOnce()
    second = GraphedApplyModel(CudaGraphs.AUTO, backend, warm=warm)
    for _ in range(4):
        x = torch.randn(2, 4)
        assert torch.equal(_call(second, ex, x, torch.ones(2), torch.zeros(1)), x)
    s = second.stats
    assert (s.eager, s.captured, s.replayed, s.warm_starts, s.failed) == (1, 1, 2, 0, [])  # as without warm start
    assert "not permitted" in s.warm_start_failed[0]
    third = GraphedApplyModel(CudaGraphs.AUTO, ReplayBackend(), warm=warm)
    for _ in range(2):
        _call(third, ex, torch.randn(2, 4), torch.ones(2), torch.zeros(1))
    assert (third.stats.eager, third.stats.captured, third.stats.warm_starts) == (1, 1, 0)  # refused: warm-up first


def test_shape_of_drops_identities_constant_values_and_small_tensor_shapes():
    big, other = torch.zeros(100), torch.zeros(100)
    _, a = _sig([object(), big, torch.tensor([1.0, 2.0]), 3], "cuda")
    _, b = _sig([object(), other, torch.tensor([1.0, 5.0]), 3], "cuda")  # e.g. another step count's sigmas
    assert a != b and shape_of(a) == shape_of(b)
    for differs in ([object(), other, torch.tensor([1.0, 2.0, 3.0]), 3],  # a constant's shape
                    [object(), other, torch.tensor([1.0, 2.0]), 4],  # a plain number
                    [object(), other, torch.tensor([1, 2]), 3]):  # a constant's dtype
        assert shape_of(_sig(differs, "cuda")[1]) != shape_of(a)
    # Graph inputs: small ones (sigmas of another step count) by dtype only, large ones by shape too.
    _, s5 = _sig([torch.zeros(5), torch.zeros(2, 64)])
    _, s29 = _sig([torch.zeros(29), torch.zeros(2, 64)])
    assert s5 != s29 and shape_of(s5) == shape_of(s29)
    assert shape_of(_sig([torch.zeros(5), torch.zeros(1, 64)])[1]) != shape_of(s5)
    assert shape_of(_sig([torch.zeros(5, dtype=torch.float64), torch.zeros(2, 64)])[1]) != shape_of(s5)
