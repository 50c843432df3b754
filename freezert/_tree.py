"""The one walk over nested inputs and outputs: ``torch.utils._pytree`` with dataclasses registered on sight.

Tuples, lists, dicts, namedtuples and transformers' ``ModelOutput`` (which registers itself) are pytree nodes
already; a dataclass becomes one the first time it is seen, so a frozen output inside a dataclass is a tensor
like any other: replayed, cached and counted, never left behind as an opaque leaf.

The usual case (tuples, lists and dicts over tensors and plain values: a call's arguments, a block's output, an
op's operands) is walked here, with a structure of plain tuples: ``pytree.tree_flatten`` leaves a reference cycle
behind each call (a recursive closure), garbage that only a collection of the whole heap frees, and this walk runs
several times per layer per step. The leaves come in pytree's order either way.
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


_ATOMS = (int, float, bool, str, type(None))


def _plain(obj: Any, leaves: list) -> Any:
    """``obj``'s structure as plain data, its leaves appended in pytree's order, when it nests only tuples, lists
    and dicts over tensors and plain values; None for anything else (pytree's walk decides). A leaf's structure is
    0, a sequence's ``(type, parts)``, a dict's ``(dict, keys, parts)``."""
    t = type(obj)
    if t is tuple or t is list:
        parts = []
        for v in obj:
            part = _plain(v, leaves)
            if part is None:
                return None
            parts.append(part)
        return t, tuple(parts)
    if t is dict:
        parts = []
        for v in obj.values():
            part = _plain(v, leaves)
            if part is None:
                return None
            parts.append(part)
        return dict, tuple(obj), tuple(parts)
    if t in _ATOMS or isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return 0
    return None


def _unplain(spec: Any, it) -> Any:
    if type(spec) is int:
        return next(it)
    if spec[0] is dict:
        return {k: _unplain(part, it) for k, part in zip(spec[1], spec[2])}
    values = [_unplain(part, it) for part in spec[1]]
    return values if spec[0] is list else tuple(values)


def flatten(obj: Any) -> tuple[list[Any], Any]:
    """Leaves (tensors and every other value) in a fixed order, and the structure to rebuild ``obj`` (hashable)."""
    leaves: list[Any] = []
    spec = _plain(obj, leaves)
    if spec is not None:
        return leaves, spec
    leaves, spec = pytree.tree_flatten(obj)
    while any(_unknown_dataclass(v) for v in leaves):  # rare: a dataclass type seen for the first time
        for v in leaves:
            if _unknown_dataclass(v):
                _register(type(v))
        leaves, spec = pytree.tree_flatten(obj)
    return leaves, spec


def unflatten(leaves: list[Any], spec: Any) -> Any:
    if isinstance(spec, pytree.TreeSpec):
        return pytree.tree_unflatten(leaves, spec)
    return _unplain(spec, iter(leaves))


def tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a nested value, in a fixed order."""
    return [v for v in flatten(obj)[0] if isinstance(v, torch.Tensor)]


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with every tensor replaced by ``fn(tensor)``; containers rebuilt as their own types."""
    leaves, spec = flatten(obj)
    return unflatten([fn(v) if isinstance(v, torch.Tensor) else v for v in leaves], spec)


def structure(leaves: list[Any], spec: Any) -> tuple:
    """What a plan depends on in a call: the containers and keyword names, each tensor's rank and dtype, the
    type of every other value (hashable)."""
    return spec, tuple(("T", v.dim(), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__ for v in leaves)
