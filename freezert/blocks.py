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
    return f"{a}.{b}" if a and b else a or b


def _is_yolo(container: nn.Module) -> bool:
    kids = list(container.children())
    return len(kids) > 1 and all(hasattr(k, "f") and hasattr(k, "i") for k in kids)


def _yolo_sources(modules: list[nn.Module]) -> list[list[int]]:
    out = []
    for i, m in enumerate(modules):
        f = m.f if isinstance(m.f, (list, tuple)) else [m.f]
        out.append([i - 1 if x == -1 else x % i for x in f] if i else [])
    return out


# Children that hold a model's head, never its blocks: torchvision's ``classifier`` (VGG's and DeepLabV3's hold
# more parameters than their features), detection heads (``rpn``, ``roi_heads``, RetinaNet's ``head``), Hugging
# Face's ``lm_head``, ``decode_head``, ``pooler``. The blocks are searched for outside them.
_HEADS = frozenset(
    {"classifier", "aux_classifier", "head", "heads", "head_dist", "fc", "lm_head", "decode_head", "rpn", "roi_heads"}
    | {"pooler", "proj_out", "qa_outputs", "score"}
)
# What torchvision calls a backbone's stages: preferred over a larger container beside them (SSD's ``extra``
# layers hold more parameters than its VGG ``features``).
_BACKBONE = ("features", "body")

Blocks = list[tuple[str, list[tuple[str, nn.Module]]]]  # (block name, its members as (dotted name, module))


def _never_called(m: nn.Module) -> bool:
    """A ModuleList or a plain ModuleDict: its forward is never called (its children are)."""
    return type(m).forward is nn.Module.forward


def _called_parts(name: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that run in place of ``m``: ``m`` itself, or, for a container that is never called (a
    ModuleList of HRNet's transitions, nested ones too), its children's, so the record sees every call."""
    if not _never_called(m) or not len(m._modules):
        return [(name, m)]
    return [part for k, c in m.named_children() for part in _called_parts(_join(name, k), c)]


def _is_container(m: nn.Module) -> bool:
    """A module whose children run in sequence as blocks: a ModuleList, a Sequential, or a ModuleDict with its own
    forward (torchvision's ``IntermediateLayerGetter``, the ``body`` of every detection and segmentation model)."""
    if isinstance(m, (nn.ModuleList, nn.Sequential)):
        return True
    return isinstance(m, nn.ModuleDict) and not _never_called(m)


def _in_head(module_name: str) -> bool:
    return any(part in _HEADS for part in module_name.split(".")) if module_name else False


def _holds_blocks(m: nn.Module) -> bool:
    kids = list(m.children()) if _is_container(m) else []
    return len(kids) >= 2 and sum(1 for k in kids if _n_params(k)) >= 2


def _main_container(model: nn.Module, heads: bool = False) -> tuple[str, Blocks | None] | None:
    """Where the blocks are, outside the head (inside it too with ``heads``, for a model that is all head: an MLP
    in ``fc``): a backbone's stages (a ``features``/``body`` container or torchvision's ``IntermediateLayerGetter``
    holding at least a quarter of the parameters outside the head), else the container (or a module with its own
    grouping: a ResNet nested as ``backbone``) with the most parameters, at least a quarter of all. Returns its
    dotted path and its groups (None: its children)."""
    total = _n_params(model)
    body = sum(p.numel() for n, p in model.named_parameters() if heads or not _in_head(n.rpartition(".")[0]))
    best: tuple[int, str, Blocks | None] | None = None
    preferred: tuple[int, str, Blocks | None] | None = None
    for name, m in model.named_modules():
        if not name or (_in_head(name) and not heads):
            continue
        grouped = _groups(m, name)
        if grouped is None and not _holds_blocks(m):
            continue
        n = _n_params(m)
        if n * 4 >= total and (best is None or n > best[0]):
            best = (n, name, grouped)
        stages = name.rpartition(".")[2] in _BACKBONE or isinstance(m, nn.ModuleDict)
        if stages and n * 4 >= body and (preferred is None or name.count(".") < preferred[0]):
            preferred = (name.count("."), name, grouped)
    pick = preferred or best
    if pick is None:
        return None if heads else _main_container(model, heads=True)
    return pick[1], pick[2]


def _largest(module: nn.Module, path: str) -> Blocks | None:
    """The blocks of one side of an encoder-decoder: its own grouping (a ResNet encoder) or its largest container,
    whatever share it holds (an mT5 encoder's vocabulary outweighs its layers)."""
    found = [(n, m, _groups(m, _join(path, n))) for n, m in module.named_modules() if not _in_head(n)]
    found = [(n, m, g) for n, m, g in found if g is not None or _holds_blocks(m)]
    if not found:
        return None
    name, m, grouped = max(found, key=lambda f: _n_params(f[1]))  # the first of the largest: the outermost
    return grouped if grouped is not None else _children_blocks(m, _join(path, name))


def _groups(model: nn.Module, path: str = "") -> Blocks | None:
    """Blocks declared by a module's own grouping among its children: timm's ``group_matcher()`` (ResNet:
    ``^layer(\\d+)``) or a torchvision-style ResNet (``conv1``, ``layer1``..``layer4``; a detection model's
    ``backbone.body`` too). The children registered before the first block form block 0, ``stem``; those after
    are the head. Names are dotted under ``path``."""
    kids = list(model.named_children())
    hits: dict[str, tuple] = {}
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        try:
            groups = dict(matcher(coarse=True))
        except Exception:  # a model's own grouping is a hint, never a requirement
            groups = {}
        # Every group but "stem", in the matcher's order, as timm reads them: most name theirs "blocks", HRNet
        # "block_types", CoaT "stem1".."serial_blocks4" (the record puts the blocks in forward order after).
        specs = [v for k, v in groups.items() if k != "stem" and isinstance(v, (str, list, tuple))]
        for ordinal, spec in enumerate(specs):
            if isinstance(spec, str):
                patterns = [spec]
            else:  # (pattern, suffix) pairs; a suffix such as (99999,) marks a final norm, not a block
                patterns = [p[0] for p in spec if isinstance(p, (list, tuple)) and len(p) == 2 and p[1] is None]
            for name, _ in kids:
                for pat in patterns:
                    mt = re.match(pat, name) if isinstance(pat, str) else None
                    if mt and mt.end() == len(name) and name not in hits:
                        hits[name] = (ordinal, *(int(g) for g in mt.groups() if g is not None and g.isdigit()))
    elif all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "conv1"):
        hits = {f"layer{i}": (i,) for i in range(1, 5)}
    if len(hits) < 2:
        return None
    first = min(i for i, (n, _) in enumerate(kids) if n in hits)
    stem = [(_join(path, n), m) for n, m in kids[:first]]
    if not stem or not any(_n_params(m) for _, m in stem):
        return None
    ordered = sorted(hits, key=lambda n: hits[n])
    return [(_join(path, "stem"), stem)] + [
        (_join(path, n), _called_parts(_join(path, n), getattr(model, n))) for n in ordered
    ]


def _group_module(members: list[tuple[str, nn.Module]]) -> nn.Module:
    if len(members) == 1:
        return members[0][1]
    group = nn.ModuleList()  # never registered in the model: a handle for parameters() and modules()
    for _, m in members:
        group._modules[str(len(group._modules))] = m
    return group


def _children_blocks(container: nn.Module, path: str) -> Blocks:
    """The children of ``container`` as blocks; a child that is never called itself (a ModuleList of layers) has
    its own children as the members that run."""
    return [(_join(path, k), _called_parts(_join(path, k), m)) for k, m in container.named_children()]


def _flattened(container: nn.Module, path: str) -> Blocks:
    """Two plain Sequentials holding the stages (SSDlite's ``backbone.features``: MobileNetV3 cut at its C4
    layer) are one sequence of their children."""
    kids = list(container.named_children())
    if len(kids) == 2 and all(type(m) is nn.Sequential and len(m) > 1 for _, m in kids):
        return [b for k, m in kids for b in _children_blocks(m, _join(path, k))]
    return _children_blocks(container, path)


def _body_children(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The root's children that are blocks when no container holds them (GoogLeNet, Inception v3, ShuffleNet):
    not a head (``fc``), not an auxiliary classifier (``aux1``, ``AuxLogits``: they run in train mode only, so a
    record in train mode would count them among the blocks and one in eval mode would not), and not the
    parameter-free modules after the last block with parameters (``avgpool``, ``dropout``): those are the head."""
    body = [(n, m) for n, m in named if n not in _HEADS and not n.lower().startswith("aux")]
    while body and not _n_params(body[-1][1]):
        body.pop()
    return body


def _encoder_decoder(model: nn.Module) -> tuple[str, Blocks] | None:
    """An encoder-decoder (T5, BART, Whisper, Marian, ``nn.Transformer``): the encoder's layers, then the decoder's,
    from the shallowest module with both an ``encoder`` and a ``decoder`` child; its path and the blocks."""
    for name, m in model.named_modules():
        sides = [(side, m._modules.get(side)) for side in ("encoder", "decoder")]
        if any(sub is None for _, sub in sides):
            continue
        blocks: Blocks = []
        for side, sub in sides:
            found = _largest(sub, _join(name, side))
            if found is None:
                return None
            blocks += found
        return name, blocks
    return None


def _outside(model: nn.Module, blocks: Blocks) -> tuple[list[str], list[tuple[str, nn.Module]]]:
    """The blocks' ancestors (every module above a member) and the candidates: each child of an ancestor that is
    neither an ancestor nor a member, in registration order, each module once."""
    names = {n for _, ms in blocks for n, _ in ms}
    inside = {id(m) for _, ms in blocks for _, m in ms}
    above = {""}
    for n in names:
        parts = n.split(".")
        above.update(".".join(parts[:i]) for i in range(1, len(parts)))
    ancestors, cands, seen = [], [], set(inside)
    for name, m in model.named_modules():
        if name not in above:
            continue
        ancestors.append(name)
        for k, child in m.named_children():
            full = _join(name, k)
            if full in above:
                continue
            for part, c in _called_parts(full, child):  # a ModuleList's children run, each stem or head
                if id(c) not in seen:
                    seen.add(id(c))
                    cands.append((part, c))
    return ancestors, cands


def _table(model: nn.Module, kind: str, path: str, blocks: Blocks) -> BlockTable:
    members = [ms for _, ms in blocks]
    ancestors, cands = _outside(model, blocks)
    return BlockTable(
        kind,
        path,
        [n for n, _ in blocks],
        [_group_module(ms) for ms in members],
        members=members,
        candidates=cands,
        ancestors=ancestors,
    )


def block_table(model: nn.Module, blocks: str | None = None) -> BlockTable:
    """Finds the block sequence of ``model`` (or of the container at dotted path ``blocks``)."""
    table = _find_blocks(model, blocks)
    inside = {id(p) for m in table.modules for p in m.parameters()}
    table.outside = any(id(p) not in inside for p in model.parameters())
    return table


def _find_blocks(model: nn.Module, blocks: str | None) -> BlockTable:
    """The search, in order: ``blocks=``; YOLO's ``model.model``; a root Sequential; the root's own grouping; an
    encoder-decoder's two layer stacks; the main container outside the head (grouped where it declares groups);
    else the root's children."""
    if not isinstance(model, nn.Module):
        raise FreezeError(f"freezert needs a torch.nn.Module, got {type(model).__name__}; pass the model itself")
    if blocks is not None and not isinstance(blocks, str):
        raise FreezeError(
            f"blocks={blocks!r} is a {type(blocks).__name__}; pass the dotted path of the block container as a "
            "string, e.g. blocks='encoder.layer' (or '' for the root's children)"
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
        elif isinstance(model, nn.ModuleDict) and not _never_called(model):
            # a root that runs its children in order and returns some of their outputs (timm's features_only
            # FeatureListNet / FeatureDictNet, torchvision's IntermediateLayerGetter): its children are the blocks
            path, container = "", model
        elif (grouped := _groups(model)) is not None:
            return _table(model, "groups", "", grouped)
        elif (encdec := _encoder_decoder(model)) is not None:
            return _table(model, "groups", *encdec)
        else:
            found = _main_container(model)
            if found is not None and found[1] is not None:
                return _table(model, "groups", *found)
            path = found[0] if found is not None else ""
            container = model.get_submodule(path) if path else model
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
    if container is model and isinstance(model, nn.Sequential):
        return BlockTable("sequential", path, names, modules, ancestors=[""])
    if container is model:
        body = _body_children(named) if blocks is None else []
        if len(body) < 2:
            return BlockTable("children", path, names, modules, ancestors=[""])
        return _table(model, "children", "", [(n, [(n, m)]) for n, m in body])
    found_blocks = _flattened(container, path) if blocks is None else _children_blocks(container, path)
    return _table(model, "container", path, found_blocks)


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
