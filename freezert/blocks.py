"""Finding a model's block sequence: the units that ``freeze=`` counts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from ._errors import FreezeError

# Wrappers that add a leading component to every name (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class BlockTable:
    """The block sequence of a model, in forward order, with the modules that run before it.

    A block is one module, or a group of sibling modules (a ResNet's ``stem``: conv1, bn1, relu, maxpool);
    ``members[i]`` lists the modules of block ``i`` as they sit in the model. ``candidates`` are the other
    modules outside the blocks (neither blocks nor their ancestors): the record sorts them into the stem (they
    run before block 0, frozen with it) and the head (they run after, trainable).
    """

    # "yolo" (model.model with .f/.i/save), "sequential" (root nn.Sequential), "container", "children", "groups"
    kind: str
    path: str  # dotted path of the container holding the blocks ("" for the root)
    names: list[str]  # dotted name of each block in the root model ("stem" for a ResNet's stem group)
    modules: list[nn.Module]  # each block's module (a group's members collected in an unregistered ModuleList)
    stem: list[tuple[str, nn.Module]] = field(default_factory=list)  # run before block 0, frozen with it
    sources: list[list[int]] | None = None  # yolo only: absolute indices each block reads
    members: list[list[tuple[str, nn.Module]]] = field(default_factory=list)
    candidates: list[tuple[str, nn.Module]] = field(default_factory=list)
    ancestors: list[str] = field(default_factory=list)  # modules on the path from the root to the blocks
    outside: bool = False  # the model has parameters in no block (a head, a stem, ViT's cls_token)

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
        if not self.members:
            self.members = [[(n, m)] for n, m in zip(self.names, self.modules)]

    def __len__(self) -> int:
        return len(self.modules)

    def reordered(self, order: list[int]) -> BlockTable:
        """The same table with its blocks in ``order`` (forward order seen by the record)."""
        return BlockTable(
            self.kind,
            self.path,
            [self.names[i] for i in order],
            [self.modules[i] for i in order],
            list(self.stem),
            None,
            [self.members[i] for i in order],
            list(self.candidates),
            list(self.ancestors),
            self.outside,
        )

    def direct_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Parameters held by the blocks' ancestors themselves (ViT's ``cls_token``): in no block, stem or head."""
        out = []
        for a in self.ancestors:
            owner = model.get_submodule(a) if a else model
            out += [(_join(a, n), p) for n, p in owner.named_parameters(recurse=False)]
        return out


def strip_wrapper_prefix(name: str) -> str:
    """Drops leading ``module.`` / ``_orig_mod.`` components that DDP and torch.compile add."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
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


def _groups(model: nn.Module) -> tuple[list[str], list[list[tuple[str, nn.Module]]]] | None:
    """Blocks declared by the model's own grouping among its top-level children: timm's ``group_matcher()``
    (ResNet: ``^layer(\\d+)``) or a torchvision-style ResNet (``layer1``..``layer4``). The children registered
    before the first block form block 0, ``stem``; those after are the head."""
    kids = list(model.named_children())
    hits: dict[str, tuple] = {}
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        try:
            spec = matcher(coarse=True).get("blocks")
        except Exception:  # a model's own grouping is a hint, never a requirement
            spec = None
        patterns = [spec] if isinstance(spec, str) else [p for p, suffix in (spec or []) if suffix is None]
        for name, _ in kids:
            for pat in patterns:
                mt = re.match(pat, name)
                if mt and mt.end() == len(name):
                    hits[name] = tuple(int(g) for g in mt.groups() if g is not None and g.isdigit())
    elif all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "conv1"):
        hits = {f"layer{i}": (i,) for i in range(1, 5)}
    if len(hits) < 2:
        return None
    first = min(i for i, (n, _) in enumerate(kids) if n in hits)
    stem = [(n, m) for n, m in kids[:first]]
    if not stem or not any(_n_params(m) for _, m in stem):
        return None
    ordered = sorted(hits, key=lambda n: hits[n])
    return ["stem", *ordered], [stem, *[[(n, model.get_submodule(n))] for n in ordered]]


def _group_module(members: list[tuple[str, nn.Module]]) -> nn.Module:
    if len(members) == 1:
        return members[0][1]
    group = nn.ModuleList()  # never registered in the model: a handle for parameters() and modules()
    for _, m in members:
        group._modules[str(len(group._modules))] = m
    return group


def _candidates(model: nn.Module, path: str) -> tuple[list[str], list[tuple[str, nn.Module]]]:
    """The ancestors of ``path`` and every child of an ancestor that is not on the path."""
    ancestors, cands = [], []
    node, prefix = model, ""
    parts = path.split(".") if path else []
    for depth in range(len(parts) + 1):
        ancestors.append(prefix)
        nxt = parts[depth] if depth < len(parts) else None
        if nxt is None:
            break
        for name, child in node.named_children():
            if name != nxt:
                cands.append((_join(prefix, name), child))
        node, prefix = getattr(node, nxt), _join(prefix, nxt)
    return ancestors, cands


def block_table(model: nn.Module, blocks: str | None = None) -> BlockTable:
    """Finds the block sequence of ``model`` (or of the container at dotted path ``blocks``)."""
    table = _find_blocks(model, blocks)
    inside = {id(p) for m in table.modules for p in m.parameters()}
    table.outside = any(id(p) not in inside for p in model.parameters())
    return table


def _find_blocks(model: nn.Module, blocks: str | None) -> BlockTable:
    if not isinstance(model, nn.Module):
        raise FreezeError(f"freezert needs a torch.nn.Module, got {type(model).__name__}; pass the model itself")
    if blocks is not None and not isinstance(blocks, str):
        raise FreezeError(
            f"blocks={blocks!r} is a {type(blocks).__name__}; pass the dotted path of the block container as a "
            "string, e.g. blocks='encoder.layer' (or '' for the root's children)"
        )
    if blocks is None:
        grouped = _groups(model)
        if grouped is not None:
            names, members = grouped
            inside = {id(m) for ms in members for _, m in ms}
            cands = [(n, m) for n, m in model.named_children() if id(m) not in inside]
            return BlockTable(
                "groups",
                "",
                names,
                [_group_module(ms) for ms in members],
                members=members,
                candidates=cands,
                ancestors=[""],
            )
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
        return BlockTable("yolo", path, names, modules, [], _yolo_sources(modules), ancestors=[""])
    if container is model:
        kind = "sequential" if isinstance(model, nn.Sequential) else "children"
        return BlockTable(kind, path, names, modules, ancestors=[""])
    ancestors, cands = _candidates(model, path)
    return BlockTable("container", path, names, modules, candidates=cands, ancestors=ancestors)


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
