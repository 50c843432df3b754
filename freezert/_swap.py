"""Putting modules in place of others inside a model, by dotted name, and taking them out again.

The wrapper's frozen runners and the kernel substitutions both live only for the duration of a call: the
user's model is edited inside ``swapped`` and restored on exit, also when the call raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

Handle = list[tuple[nn.Module, str, nn.Module]]


def hook_count(m: nn.Module) -> int:
    """The hooks a call of ``m`` runs that are its own: forward, pre-forward, backward and pre-backward (a module
    put in its place would not run them)."""
    return len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)


def apply_substitutions(module: nn.Module, plan: list[tuple[str, nn.Module]]) -> Handle:
    """Swap each planned replacement into ``module``; returns what ``restore`` needs to undo it."""
    done: Handle = []
    try:
        for name, rep in plan:
            parent_name, _, key = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if key not in parent._modules:
                raise KeyError(f"{name!r} is not a submodule of {type(module).__name__}")
            done.append((parent, key, parent._modules[key]))
            parent._modules[key] = rep
    except BaseException:
        restore(done)
        raise
    return done


def restore(handle: Handle) -> None:
    """Put back the original modules recorded by ``apply_substitutions`` (in reverse order)."""
    for parent, key, old in reversed(handle):
        parent._modules[key] = old


@contextlib.contextmanager
def swapped(module: nn.Module, plan: list[tuple[str, nn.Module]]) -> Iterator[nn.Module]:
    """Within the block, ``module`` runs with the replacements; the originals return on exit."""
    handle = apply_substitutions(module, plan)
    try:
        yield module
    finally:
        restore(handle)
