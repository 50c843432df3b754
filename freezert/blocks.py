"""Finding a model's block sequence: the units that ``freeze=`` counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ._errors import FreezeError

# Wrappers that add a leading component to every name (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class BlockTable:
    """The block sequence of a model, in forward order, with the modules that run before it."""

    kind: str  # "yolo" (model.model with .f/.i/save), "sequential" (root is nn.Sequential), "container", "children"
    path: str  # dotted path of the container holding the blocks ("" for the root)
    names: list[str]  # dotted name of each block in the root model
    modules: list[nn.Module]
    stem: list[tuple[str, nn.Module]] = field(default_factory=list)  # run before block 0, frozen with it
    sources: list[list[int]] | None = None  # yolo only: absolute indices each block reads

    @property
    def save(self) -> set[int]:
        """YOLO's ``save``: blocks whose outputs a later block reads through an explicit ``.f`` entry."""
        if self.kind != "yolo":
            return set()
        out = set()
        for i, m in enumerate(self.modules):
            for x in m.f if isinstance(m.f, (list, tuple)) else [m.f]:
                if x != -1:
                    out.add(x % i)
        return out

    def __post_init__(self) -> None:
        self.keys = [n.rpartition(".")[2] for n in self.names]  # each block's attribute name in its container

    def __len__(self) -> int:
        return len(self.modules)


def strip_wrapper_prefix(name: str) -> str:
    """Drops leading ``module.`` / ``_orig_mod.`` components that DDP and torch.compile add."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _is_yolo(container: nn.Module) -> bool:
    kids = list(container.children())
    return len(kids) > 1 and all(hasattr(k, "f") and hasattr(k, "i") for k in kids)


def _yolo_sources(modules: list[nn.Module]) -> list[list[int]]:
    out = []
    for i, m in enumerate(modules):
        f = m.f if isinstance(m.f, (list, tuple)) else [m.f]
        out.append([i - 1 if x == -1 else x % i for x in f] if i else [])
    return out


def _stem(root: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """Modules with parameters registered before the branch that leads to ``path``, at every level."""
    stem: list[tuple[str, nn.Module]] = []
    node, prefix = root, ""
    for part in path.split(".") if path else []:
        for name, child in node.named_children():
            if name == part:
                break
            if _n_params(child):
                stem.append((_join(prefix, name), child))
        node, prefix = getattr(node, part), _join(prefix, part)
    return stem


def _main_container(model: nn.Module) -> str | None:
    """The ModuleList/Sequential holding the largest share (at least a quarter) of the parameters."""
    total = _n_params(model)
    best, best_n = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.children())
        if len(kids) < 2 or sum(1 for k in kids if _n_params(k)) < 2:
            continue
        n = _n_params(m)
        if n > best_n:
            best, best_n = name, n
    if best is not None and total and best_n * 4 >= total:
        return best
    return None


def block_table(model: nn.Module, blocks: str | None = None) -> BlockTable:
    """Finds the block sequence of ``model`` (or of the container at dotted path ``blocks``)."""
    if not isinstance(model, nn.Module):
        raise FreezeError(f"freezert needs a torch.nn.Module, got {type(model).__name__}; pass the model itself")
    if blocks is not None:
        path = strip_wrapper_prefix(blocks).rstrip(".")
        try:
            container = model.get_submodule(path) if path else model
        except AttributeError:
            candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and n]
            raise FreezeError(
                f"blocks={blocks!r} names no submodule of {type(model).__name__}; "
                f"containers that exist: {', '.join(candidates[:12]) or 'none'}"
            ) from None
    else:
        inner = getattr(model, "model", None)
        if isinstance(inner, (nn.Sequential, nn.ModuleList)) and _is_yolo(inner):
            path, container = "model", inner
        elif isinstance(model, nn.Sequential):
            path, container = "", model
        else:
            path = _main_container(model)
            container = model.get_submodule(path) if path else model
            path = path or ""
    named = list(container.named_children())
    if len(named) < 2:
        raise FreezeError(
            f"the block container {path or type(model).__name__!r} has {len(named)} child module(s); "
            "freezing needs at least two blocks: name a deeper container with blocks='dotted.path'"
        )
    names = [_join(path, n) for n, _ in named]
    modules = [m for _, m in named]
    if _is_yolo(container):
        return BlockTable("yolo", path, names, modules, [], _yolo_sources(modules))
    if container is model:
        kind = "sequential" if isinstance(model, nn.Sequential) else "children"
        return BlockTable(kind, path, names, modules)
    return BlockTable("container", path, names, modules, _stem(model, path))


def as_named_blocks(blocks, empty: str) -> list[tuple[str, nn.Module]]:
    """Normalises a block list (modules or (name, module) pairs) to (name, module) pairs; ``empty``: the error
    message for an empty list."""
    out: list[tuple[str, nn.Module]] = []
    for i, b in enumerate(blocks):
        if isinstance(b, nn.Module):
            out.append((str(i), b))
        elif isinstance(b, tuple) and len(b) == 2 and isinstance(b[1], nn.Module):
            out.append((str(b[0]), b[1]))
        else:
            raise FreezeError(f"block {i} is a {type(b).__name__}; pass blocks as modules or (name, module) pairs")
    if not out:
        raise FreezeError(empty)
    return out


def find_blocks(model: nn.Module, blocks: str | None = None) -> list[tuple[str, nn.Module]]:
    """The block sequence of ``model`` as (dotted name, module) pairs, in order."""
    t = block_table(model, blocks)
    return list(zip(t.names, t.modules))
