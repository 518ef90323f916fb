"""Strict serialisation for what a MODEL carries to the workers: data, and callables as *recipes*.

A worker must end up with the same function the host has, not a copy of its bytecode. So a value
travels only if it pickles with the standard ``pickle`` rules (module-level functions and classes by
name, in a module the worker can import: a dotted name, not ``__main__`` and not one of ComfyUI's
path-named custom-node modules) or matches one of two recipes:

* a **nested function / closure** (``RescaleCFG.patch.<locals>.rescale_cfg``): sent as (module,
  qualname, code fingerprint, closure values, defaults); the worker imports the module, finds the code
  object with that qualname *and* fingerprint inside the enclosing module-level function, and builds a
  function from it with the module's globals and the (themselves strictly pickled) closure values;
* a **body-less local class** (``ModelSamplingSD3.patch.<locals>.ModelSamplingAdvanced(base1, base2)``
  with nothing in its body): rebuilt in the worker as the same-named class of the same (importable)
  bases; its instances carry their ``__dict__`` as usual.

Anything else (a module-level lambda, a closure over a lock, a class body defined in a function, a
custom-node module) raises ``CannotTravel`` naming the object. Tensors never enter the byte stream: they
are collected (``detach().cpu()``) into a tuple that travels next to it through Ray's object store.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import pickle
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# What a class statement puts in a class __dict__ by itself (a body-less class has nothing else).
_EMPTY_CLASS_KEYS = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
                               "__firstlineno__", "__static_attributes__", "__slotnames__"})
_LOCAL_CLASSES: dict[tuple[str, str, tuple[type, ...]], type] = {}


class CannotTravel(ValueError):
    """A value that cannot be rebuilt identically in a worker; ``str()`` names it and why."""


@dataclass(frozen=True)
class Packed:
    """A strictly pickled value: ``blob`` (no tensor data) plus the tensors it references, in order."""

    blob: bytes
    tensors: tuple[Any, ...] = ()

    def digest(self) -> str:
        """sha256 over the blob and every tensor's dtype, shape and bytes (the content key)."""
        h = hashlib.sha256(self.blob)
        for t in self.tensors:
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.contiguous().reshape(-1).view(_uint8()).numpy().tobytes())
        return h.hexdigest()


def _uint8() -> Any:
    import torch

    return torch.uint8


def describe_callable(obj: Any) -> str:
    """``qualname from module`` for a function or class, else its type name."""
    qual = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{qual} from {getattr(obj, '__module__', None) or type(obj).__module__}"


def _check_module(name: str | None, what: Any) -> None:
    """Raise when a worker surely cannot import module ``name`` by that name (else pickle decides)."""
    if not name or name == "__main__" or not all(p.isidentifier() for p in name.split(".")):
        raise CannotTravel(f"{describe_callable(what)}: its module cannot be imported by name in a worker "
                           "(a custom-node or __main__ module)")
    spec = getattr(sys.modules.get(name), "__spec__", None)
    if spec is not None and spec.name != name:
        raise CannotTravel(f"{describe_callable(what)}: module {name} was loaded under another name ({spec.name})")


def _resolve(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _code_fingerprint(code: types.CodeType) -> str:
    """A hash of what the code does (bytecode, names, constants, nested code), not where it lives."""
    h = hashlib.sha256()
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, code.co_argcount,
                   code.co_kwonlyargcount, code.co_flags)).encode())
    for c in code.co_consts:
        h.update(_const_repr(c).encode())
    return h.hexdigest()


def _const_repr(c: Any) -> str:
    """repr of a code constant that is the same in every process (frozensets of str are hash-ordered)."""
    if isinstance(c, types.CodeType):
        return _code_fingerprint(c)
    if isinstance(c, frozenset):
        return "frozenset(" + ",".join(sorted(_const_repr(x) for x in c)) + ")"
    if isinstance(c, tuple):
        return "(" + ",".join(_const_repr(x) for x in c) + ")"
    return repr(c)


def _codes_under(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _codes_under(c)


def _root_code(module: str, qualname: str) -> types.CodeType | None:
    """The code of the module-level function/method that encloses ``qualname`` (before ``<locals>``)."""
    outer = qualname.split(".<locals>.")[0]
    try:
        obj = _resolve(module, outer)
    except (ImportError, AttributeError):
        return None
    obj = inspect.unwrap(getattr(obj, "__func__", obj))
    return getattr(obj, "__code__", None)


def find_code(module: str, qualname: str, fingerprint: str) -> types.CodeType | None:
    """The code object of nested function ``qualname`` in ``module`` with this fingerprint, or None."""
    root = _root_code(module, qualname)
    if root is None:
        return None
    for code in _codes_under(root):
        if getattr(code, "co_qualname", code.co_name) == qualname and _code_fingerprint(code) == fingerprint:
            return code
    return None


def rebuild_function(module: str, qualname: str, fingerprint: str, cells: tuple[Any, ...], defaults: Any,
                     kwdefaults: Any, attrs: dict[str, Any]) -> types.FunctionType:
    """Worker side of the nested-function recipe (must stay importable: pickle refers to it by name)."""
    code = find_code(module, qualname, fingerprint)
    if code is None:
        raise CannotTravel(f"{qualname} from {module}: no code with this fingerprint in the worker's copy of "
                           f"{module} (host and workers run different sources?)")
    closure = tuple(types.CellType(v) for v in cells) if code.co_freevars else None
    fn = types.FunctionType(code, vars(importlib.import_module(module)), code.co_name, defaults, closure)
    fn.__kwdefaults__ = kwdefaults
    fn.__qualname__ = qualname
    fn.__dict__.update(attrs)
    return fn


def rebuild_class(module: str, qualname: str, bases: tuple[type, ...]) -> type:
    """Worker side of the body-less local class recipe; one class per (module, qualname, bases)."""
    key = (module, qualname, bases)
    if key not in _LOCAL_CLASSES:
        _LOCAL_CLASSES[key] = type(qualname.rsplit(".", 1)[-1], bases, {"__module__": module, "__qualname__": qualname})
    return _LOCAL_CLASSES[key]


def _function_recipe(fn: types.FunctionType) -> tuple[Any, ...]:
    """(rebuild_function, args) for a nested function, or ``CannotTravel`` naming it."""
    module, qual = fn.__module__, fn.__qualname__
    _check_module(module, fn)
    if ".<locals>." not in qual:
        raise CannotTravel(f"{describe_callable(fn)}: a module-level lambda or renamed function cannot be found by "
                           "name in a worker; define it with def at module level")
    fingerprint = _code_fingerprint(fn.__code__)
    if find_code(module, qual, fingerprint) is None:
        raise CannotTravel(f"{describe_callable(fn)}: its code cannot be found inside {qual.split('.<locals>.')[0]}")
    cells = []
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:
            raise CannotTravel(f"{describe_callable(fn)}: its closure variable '{name}' is unset") from None
        try:
            pack(value)
        except CannotTravel as e:
            raise CannotTravel(f"{describe_callable(fn)} captures '{name}': {e}") from None
        cells.append(value)
    return rebuild_function, (module, qual, fingerprint, tuple(cells), fn.__defaults__, fn.__kwdefaults__,
                              dict(fn.__dict__))


def _class_recipe(cls: type) -> tuple[Any, ...]:
    """(rebuild_class, args) for a body-less local class, or ``CannotTravel`` naming it."""
    extra = sorted(set(vars(cls)) - _EMPTY_CLASS_KEYS)
    if extra or type(cls) is not type:
        raise CannotTravel(f"class {describe_callable(cls)} is defined inside a function with its own body "
                           f"({', '.join(extra) or type(cls).__name__}); workers cannot rebuild it")
    for base in cls.__bases__:
        if "<locals>" in base.__qualname__:
            raise CannotTravel(f"class {describe_callable(cls)} derives from local class {base.__qualname__}")
        _check_module(base.__module__, base)
    return rebuild_class, (cls.__module__, cls.__qualname__, cls.__bases__)


class _Pickler(pickle.Pickler):
    """Standard pickling plus the two recipes; tensors are replaced by their index in ``self.tensors``."""

    def __init__(self, buf: io.BytesIO) -> None:
        super().__init__(buf, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[Any] = []
        self._tensor_ids: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:
        import torch

        if type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter:
            if id(obj) not in self._tensor_ids:
                self._tensor_ids[id(obj)] = len(self.tensors)
                t = obj.detach().cpu()
                self.tensors.append(torch.nn.Parameter(t, obj.requires_grad) if type(obj) is torch.nn.Parameter else t)
            return self._tensor_ids[id(obj)]
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType):
            if "<locals>" in obj.__qualname__ or obj.__name__ == "<lambda>":
                return _function_recipe(obj)
            _check_module(obj.__module__, obj)
        elif isinstance(obj, type) and obj.__module__ != "builtins":
            if "<locals>" in obj.__qualname__:
                return _class_recipe(obj)
            _check_module(obj.__module__, obj)
        return NotImplemented


class _Unpickler(pickle.Unpickler):
    def __init__(self, buf: io.BytesIO, tensors: tuple[Any, ...]) -> None:
        super().__init__(buf)
        self._tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        return self._tensors[pid]


def pack(value: Any) -> Packed:
    """Strictly pickle ``value``; raises ``CannotTravel`` naming the first thing that cannot travel."""
    buf = io.BytesIO()
    p = _Pickler(buf)
    try:
        p.dump(value)
    except CannotTravel:
        raise
    except Exception as e:  # noqa: BLE001  (any failure to serialise means: sample on one device, named)
        raise CannotTravel(f"{type(e).__name__}: {e}" if not isinstance(e, (TypeError, pickle.PicklingError))
                           else str(e)) from None
    return Packed(buf.getvalue(), tuple(p.tensors))


def unpack(packed: Packed) -> Any:
    """Worker side of ``pack`` (imports the modules the recipes name)."""
    return _Unpickler(io.BytesIO(packed.blob), packed.tensors).load()
