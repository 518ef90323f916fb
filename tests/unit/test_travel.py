"""``engine.travel``: what crosses to the workers, and what is refused with a name (no ComfyUI needed)."""

from __future__ import annotations

import threading

import pytest

from xdit_multigpu.engine.travel import CannotTravel, pack, unpack

MODULE_LAMBDA = lambda x: x + 1  # noqa: E731


def make_scaler(factor: float):
    def scale(x):
        return x * factor

    return scale


class Base:
    def value(self) -> int:
        return 3


def make_local_instance(v: int):
    class Local(Base):
        pass

    obj = Local()
    obj.v = v
    return obj


def make_locked():
    lock = threading.Lock()

    def locked():
        return lock

    return locked


def make_local_with_body():
    class Bodied(Base):
        def value(self) -> int:
            return 4

    return Bodied()


def test_closure_travels_as_a_recipe_and_keeps_its_values():
    fn = unpack(pack(make_scaler(2.5)))
    assert fn(2) == 5.0 and fn.__qualname__ == "make_scaler.<locals>.scale"
    assert fn.__code__ is make_scaler(1.0).__code__  # the worker's own code object, not a copy


def test_bodyless_local_class_is_rebuilt_from_its_bases():
    obj = unpack(pack(make_local_instance(7)))
    assert obj.v == 7 and obj.value() == 3 and isinstance(obj, Base)
    assert type(obj).__qualname__ == "make_local_instance.<locals>.Local"
    assert type(unpack(pack(make_local_instance(1)))) is type(obj)  # one rebuilt class per recipe


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (MODULE_LAMBDA, "module-level lambda"),
        (make_local_with_body(), "with its own body (value)"),
        (make_locked(), "captures 'lock'"),
    ],
)
def test_what_cannot_travel_is_named(value, needle):
    with pytest.raises(CannotTravel) as err:
        pack({"entry": value})
    assert needle in str(err.value), str(err.value)


def test_tensors_travel_beside_the_pickle_and_enter_the_digest():
    import torch

    t = torch.arange(6.0)
    packed = pack({"a": t, "b": [t]})
    assert len(packed.tensors) == 1 and len(packed.blob) < 200
    out = unpack(packed)
    assert torch.equal(out["a"], t) and out["b"][0] is out["a"]
    assert pack({"a": t + 1, "b": [t]}).digest() != packed.digest()
    assert pack({"a": t.clone(), "b": [t]}).digest() != packed.digest()  # two tensors now
