"""The one walk over nested inputs and outputs: ``torch.utils._pytree`` with dataclasses registered on sight.

Tuples, lists, dicts, namedtuples and transformers' ``ModelOutput`` (which registers itself) are pytree nodes
already; a dataclass becomes one the first time it is seen, so a frozen output inside a dataclass is a tensor
like any other: replayed, cached and counted, never left behind as an opaque leaf.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["flatten", "map_tensors", "structure", "tensors", "unflatten"]

_LOCK = threading.Lock()
_REGISTERED: set[type] = set()


def _dataclass_flatten(obj):
    names = [f.name for f in dataclasses.fields(obj)]
    return [getattr(obj, n) for n in names], names


def _dataclass_unflatten(values, names, cls):
    # Rebuilt without __init__/__post_init__: the value already passed them once, and a frozen dataclass or an
    # init=False field could not be given back through them.
    obj = cls.__new__(cls)
    for n, v in zip(names, values):
        object.__setattr__(obj, n, v)
    return obj


def _register(cls: type) -> None:
    with _LOCK:
        if cls in _REGISTERED or cls in pytree.SUPPORTED_NODES:
            return
        pytree.register_pytree_node(
            cls,
            _dataclass_flatten,
            lambda values, names, cls=cls: _dataclass_unflatten(values, names, cls),
            serialized_type_name=f"freezert.dataclass.{cls.__module__}.{cls.__qualname__}",
        )
        _REGISTERED.add(cls)


def _unknown_dataclass(leaf: Any) -> bool:
    return dataclasses.is_dataclass(leaf) and not isinstance(leaf, type) and type(leaf) not in pytree.SUPPORTED_NODES


_LEAF = pytree.tree_flatten(0)[1]  # a lone tensor's structure


def flatten(obj: Any) -> tuple[list[Any], pytree.TreeSpec]:
    """Leaves (tensors and every other value) in a fixed order, and the structure to rebuild ``obj``."""
    if type(obj) is torch.Tensor:
        return [obj], _LEAF
    leaves, spec = pytree.tree_flatten(obj)
    while any(_unknown_dataclass(v) for v in leaves):  # rare: a dataclass type seen for the first time
        for v in leaves:
            if _unknown_dataclass(v):
                _register(type(v))
        leaves, spec = pytree.tree_flatten(obj)
    return leaves, spec


def unflatten(leaves: list[Any], spec: pytree.TreeSpec) -> Any:
    return pytree.tree_unflatten(leaves, spec)


_ATOMS = (int, float, bool, str, type(None))


def _walk(obj: Any, out: list) -> bool:
    """Appends the tensors of ``obj`` in pytree's order if it nests only tuples, lists and dicts (the usual call and
    output); False for any other container (pytree's walk decides). Made for the per-call paths: it leaves no
    garbage behind (``pytree.tree_flatten`` leaves a reference cycle per call, which only a full collection frees)."""
    t = type(obj)
    if t is torch.Tensor:
        out.append(obj)
        return True
    if t is tuple or t is list:
        for v in obj:
            if not _walk(v, out):
                return False
        return True
    if t is dict:
        for v in obj.values():
            if not _walk(v, out):
                return False
        return True
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return True
    return t in _ATOMS


def _rebuild(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``map_tensors`` for what ``_walk`` accepts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    t = type(obj)
    if t is tuple:
        return tuple([_rebuild(v, fn) for v in obj])
    if t is list:
        return [_rebuild(v, fn) for v in obj]
    if t is dict:
        return {k: _rebuild(v, fn) for k, v in obj.items()}
    return obj


def tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a nested value, in a fixed order."""
    out: list[torch.Tensor] = []
    if _walk(obj, out):
        return out
    return [v for v in flatten(obj)[0] if isinstance(v, torch.Tensor)]


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with every tensor replaced by ``fn(tensor)``; containers rebuilt as their own types."""
    if _walk(obj, []):
        return _rebuild(obj, fn)
    leaves, spec = flatten(obj)
    return unflatten([fn(v) if isinstance(v, torch.Tensor) else v for v in leaves], spec)


def structure(leaves: list[Any], spec: pytree.TreeSpec) -> tuple:
    """What a plan depends on in a call: the containers and keyword names, each tensor's rank and dtype, the
    type of every other value (hashable)."""
    return spec, tuple(("T", v.dim(), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__ for v in leaves)
