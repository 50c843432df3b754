"""Plans which parts of a model run through ``freezert.ops``, and applies the plan for the duration of a block.

* ``impl="lean"`` (exact: values, gradients and BatchNorm statistics are eager's bit for bit): every maximal
  trainable subtree becomes a lean region (``ops.lean``: BN, LayerNorm, activations, dropout, residual sums and
  concatenations kept as recipes), plus module swaps for what the region cannot see as one call: transformers'
  Llama RMSNorm (``LeanRMSNorm``) and Python-formula activations such as GPT-2's ``NewGELUActivation``
  (``LeanElementwise``).
* ``impl="triton"``: Conv->BN->act blocks and LayerNorms swapped for modules that call the Triton kernels.
* ``impl="auto"``: the Triton modules (deciding per call: Triton on CUDA, lean elsewhere) inside lean regions.

A replacement holds the very same child modules / Parameter / buffer objects as the original, so parameter
identity, buffers and ``state_dict`` keys are unchanged while it is swapped in; a region only adds forward hooks.
The input module is never edited by ``plan_substitutions``; ``swapped`` edits it only inside the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .._swap import Handle, apply_substitutions, hook_count, restore  # noqa: F401 (re-exported)
from .._swap import swapped as _swapped
from . import _registry as reg
from .batch_norm_act import batch_norm_act
from .batch_norm_lean import module_step
from .layer_norm import layer_norm
from .lean import composes, in_region, lean_region, saving_region, thresholded
from .lean_modules import (
    LeanActivation,
    LeanBatchNorm,
    LeanConvBNAct,
    LeanDropout,
    LeanElementwise,
    LeanLayerNorm,
    LeanRMSNorm,
    _Shell,
    plain_batch_norm,
)
from .recompute import recompute_saved
from .rms_norm import is_llama_rms_norm

_ACT_NAMES: dict[type, str] = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "identity"}
_TRITON_ACTS = ("silu", "relu", "identity")


# the lean path only: the Triton kernels know silu / relu / identity
_LEAN_ACT_NAMES: dict[type, str] = {nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}


def _act_name(m: nn.Module) -> str | None:
    if type(m) is nn.GELU:
        return "gelu" if m.approximate == "none" else "gelu_tanh"
    return _ACT_NAMES.get(type(m)) or _LEAN_ACT_NAMES.get(type(m))


# transformers' activation modules (transformers.activations), matched by class name: no import needed.
# These call one torch function (F.silu, F.gelu): a lean region sees that call.
_HF_ACTS = {
    "SiLUActivation": "silu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUActivation": "gelu",
}
# These are Python formulas of several elementwise ops (GPT-2's gelu_new is a tanh formula, not F.gelu's kernel):
# eager keeps several intermediates; LeanElementwise keeps the input and reruns the formula in backward.
_HF_FORMULAS = {
    "NewGELUActivation",
    "FastGELUActivation",
    "QuickGELUActivation",
    "AccurateGELUActivation",
    "ReLUSquaredActivation",
    "LaplaceActivation",
}


def _formula_act(m: nn.Module) -> bool:
    if not type(m).__module__.startswith("transformers.") or m._parameters or m._buffers or m._modules:
        return False
    if type(m).__name__ in _HF_FORMULAS:
        return True
    # GELUActivation(use_gelu_python=True) computes erf's formula in Python
    return type(m).__name__ == "GELUActivation" and getattr(m, "act", None) is not F.gelu


def _standalone_act(m: nn.Module) -> str | None:
    name = _act_name(m)
    if name is None and type(m).__module__.startswith("transformers."):
        name = _HF_ACTS.get(type(m).__name__)
        if name == "gelu" and getattr(m, "act", None) is not F.gelu:  # use_gelu_python: a Python formula
            name = None
    return name


def _sequential(m: nn.Module) -> bool:
    # nn.Sequential itself, or a subclass that only names it (torchvision's Conv2dNormActivation)
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _plain_bn(m: nn.Module) -> bool:
    # subclasses that override forward (SyncBatchNorm is not a BatchNorm2d anyway) do something else
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward


def _hooked(m: nn.Module) -> bool:
    # a replacement would silently drop hooks registered on the block itself
    return hook_count(m) > 0


class FusedConvBNAct(nn.Module):
    """``act(bn(conv(x)))`` with BN and the activation fused; children are the original modules."""

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        act: nn.Module,
        names: tuple[str, str, str] = ("conv", "bn", "act"),
        impl: str = "triton",
    ):
        super().__init__()
        activation = _act_name(act)
        if activation is None or (impl == "triton" and activation not in _TRITON_ACTS):
            raise ValueError(
                f"activation {type(act).__name__} is not fusable; use SiLU, ReLU or Identity"
                " (or GELU with impl='lean' / 'auto')"
            )
        self._impl = reg.check_impl(impl)
        self._names = names
        self._activation = activation
        for name, mod in zip(names, (conv, bn, act)):
            self._modules[name] = mod  # the same objects: parameters, buffers, keys unchanged
        self.training = bn.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self._modules[self._names[0]], self._modules[self._names[1]]
        return batch_norm_act(conv(x), *module_step(bn), self._activation, impl=self._impl)


class FusedLayerNorm(nn.Module):
    """``nn.LayerNorm`` calling the fused op; registers the original weight / bias Parameter objects."""

    def __init__(self, ln: nn.LayerNorm, impl: str = "triton"):
        super().__init__()
        self._impl = reg.check_impl(impl)
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.elementwise_affine = ln.elementwise_affine
        self.register_parameter("weight", ln.weight)
        self.register_parameter("bias", ln.bias)
        self.training = ln.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, impl=self._impl)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


def _replacement(m: nn.Module, impl: str) -> nn.Module | None:
    rep = _fused(m, impl)
    if rep is not None and not isinstance(rep, _Shell):  # a shell reads every attribute from the original
        # plain attributes a parent may read, e.g. YOLO's per-layer .f / .i / .type / .np
        for key, value in vars(m).items():
            if not key.startswith("_") and key != "training" and key not in vars(rep):
                setattr(rep, key, value)
    return rep


def _fusable_act(act: nn.Module, impl: str) -> str | None:
    name = _act_name(act)
    return name if name is not None and (impl != "triton" or name in _TRITON_ACTS) else None


def _conv_bn_act_forward(self, x):
    return self.act(self.bn(self.conv(x)))


def _lean_conv_bn_act(m: nn.Module) -> LeanConvBNAct | None:
    """``LeanConvBNAct`` for a module whose forward is exactly ``act(bn(conv(x)))``: an ``nn.Sequential`` of a
    convolution, a plain BatchNorm and an activation, or a class whose forward's code is that expression
    (Ultralytics' and YOLOv5's ``Conv``), with no hooks on the BatchNorm or the activation."""
    if _sequential(m) and len(m) == 3:
        names = tuple(m._modules)
    else:
        fwd = getattr(type(m).forward, "__code__", None)
        ref = _conv_bn_act_forward.__code__
        if fwd is None or set(m._modules) != {"conv", "bn", "act"}:
            return None
        # the same instructions on the same names (the reference loads no constant: a docstring may differ)
        if (fwd.co_code, fwd.co_names, fwd.co_argcount) != (ref.co_code, ref.co_names, ref.co_argcount):
            return None
        names = ("conv", "bn", "act")
    conv, bn, act = (m._modules[n] for n in names)
    if not isinstance(conv, nn.modules.conv._ConvNd) or not plain_batch_norm(bn) or _hooked(bn) or _hooked(act):
        return None
    name = _act_name(act)
    return None if name is None else LeanConvBNAct(m, names, name)


def _lean_swap(m: nn.Module) -> nn.Module | None:
    """The lean module swap for ``m`` (lean and auto plans), or None."""
    fused = _lean_conv_bn_act(m)
    if fused is not None:
        return fused
    if is_llama_rms_norm(m) and not m._modules and not m._buffers:
        return LeanRMSNorm(m)
    if _formula_act(m):
        return LeanElementwise(m)
    if plain_batch_norm(m):
        return LeanBatchNorm(m)
    if type(m) is nn.LayerNorm:
        return LeanLayerNorm(m)
    if type(m) is nn.Dropout:
        return LeanDropout(m)
    name = _standalone_act(m)
    return None if name in (None, "identity") else LeanActivation(m, name)


def _fused(m: nn.Module, impl: str) -> nn.Module | None:
    if _hooked(m):
        return None
    if impl == "lean":
        return _lean_swap(m)
    if type(m) is nn.LayerNorm:
        return FusedLayerNorm(m, impl)
    if _sequential(m) and len(m) == 3:
        conv, bn, act = m[0], m[1], m[2]
        if (
            isinstance(conv, nn.Conv2d)
            and _plain_bn(bn)
            and _fusable_act(act, impl) not in (None, "identity")
            and not _hooked(conv)
            and not _hooked(bn)
            and not _hooked(act)
        ):
            return FusedConvBNAct(conv, bn, act, names=tuple(m._modules), impl=impl)
    else:
        children = m._modules
        if set(children) == {"conv", "bn", "act"}:  # YOLOv5 / Ultralytics Conv: forward is act(bn(conv(x)))
            conv, bn, act = children["conv"], children["bn"], children["act"]
            if (
                isinstance(conv, nn.Conv2d)
                and _plain_bn(bn)
                and _fusable_act(act, impl) is not None
                and not _hooked(bn)
                and not _hooked(act)
            ):
                return FusedConvBNAct(conv, bn, act, impl=impl)
    return _lean_swap(m) if impl == "auto" else None


class LeanRegion:
    """Plan entry: the named module's forward runs inside ``ops.recompute_saved()`` (``saves``: the root of a
    trainable subtree) and/or ``ops.lean.lean_region()``'s op routing (``ops``: a module whose own forward code
    adds, multiplies, concatenates or calls activations: ``lean.composes``); ``min_elements``: the plan's size
    threshold, which ``swapped`` puts in force for the whole block (``lean.thresholded``). Forward hooks added by
    ``swapped``; the module itself is not replaced."""

    def __init__(self, saves: bool = True, ops: bool = True, min_elements: int = 0):
        self.saves, self.ops, self.min_elements = saves, ops, min_elements

    def install(self, module: nn.Module) -> list:
        """Add the hooks that enter and leave the region around ``module``'s forward; returns their handles."""
        opened: list = []

        def enter(mod, args):
            ctx = lean_region() if self.ops else saving_region()
            ctx.__enter__()
            opened.append(ctx)

        def leave(mod, args, output):
            if opened:
                opened.pop().__exit__(None, None, None)

        return [
            module.register_forward_pre_hook(enter, prepend=True),
            module.register_forward_hook(leave, always_call=True),
        ]

    def __repr__(self) -> str:
        return f"LeanRegion(saves={self.saves}, ops={self.ops}, min_elements={self.min_elements})"


def plan_substitutions(
    module: nn.Module,
    *,
    skip: Callable[[str], bool] = lambda name: False,
    impl: str = "triton",
    min_elements: int = 0,
) -> list[tuple[str, nn.Module | LeanRegion]]:
    """(dotted name, replacement) for what runs through ``freezert.ops`` below ``module``.

    ``skip(name)`` excludes a module (e.g. frozen blocks: the wrapper skips them, their descendants and their
    ancestors); the root itself is never replaced. ``impl``: "lean" (exact lean regions over every maximal
    trainable subtree, plus the module swaps they need; any device), "triton" (Triton kernels where they run,
    else eager), "auto" (the Triton modules inside lean regions; Triton on CUDA inputs, lean elsewhere).
    ``min_elements``: inside the regions, tensors smaller than this go through eager's ops (``lean.MIN_ELEMENTS``
    is ``kernels="auto"``'s; 0, every size, is ``kernels="lean"``'s).
    """
    reg.check_impl(impl)
    plan: list[tuple[str, nn.Module | LeanRegion]] = []

    def visit(prefix: str, m: nn.Module, region: bool, routed: bool) -> None:
        # routed: an ancestor's forward routes ops already (its mode covers the modules it calls)
        for name, child in m._modules.items():
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if skip(full):
                visit(full, child, False, False)
                continue
            rep = _replacement(child, impl)
            ops = False
            if impl != "triton":
                ops = rep is None and not routed and composes(child)
                if ops or not region:
                    plan.append((full, LeanRegion(saves=not region, ops=ops, min_elements=min_elements)))
            if rep is not None:
                plan.append((full, rep))
            else:
                visit(full, child, region or impl != "triton", routed or ops)

    visit("", module, False, False)
    return plan


def lean_plan(module: nn.Module, *, skip: Callable[[str], bool] = lambda name: False) -> list:
    """The exact lean substitutions of ``module`` (``plan_substitutions(..., impl="lean")``): run its trainable
    part inside ``swapped(module, plan)`` for eager's values, gradients and BatchNorm statistics, bit for bit,
    with fewer bytes saved for backward."""
    return plan_substitutions(module, skip=skip, impl="lean")


def _recipes(plan: list) -> bool:
    """True when some replacement marks its output recomputable (every fused Conv-BN-act path does, and
    the lean LayerNorm, RMSNorm and activations)."""
    return any(
        isinstance(
            rep,
            (FusedConvBNAct, LeanConvBNAct, LeanActivation, LeanRMSNorm, LeanElementwise, LeanBatchNorm, LeanLayerNorm),
        )
        or (isinstance(rep, FusedLayerNorm) and rep._impl != "triton")
        for _, rep in plan
    )


# (module, plan) of every swapped() block open now, outermost first: checkpoint's recompute replays them
_ACTIVE: list[tuple[nn.Module, list]] = []


@contextlib.contextmanager
def swapped(module: nn.Module, plan: list, *, recompute: bool = True) -> Iterator[nn.Module]:
    """``module`` runs with the plan inside the block: replacements swapped in, lean regions hooked; activations
    that later layers save are stored as recipes (``ops.recompute``), unless ``recompute=False``."""
    mods = [(n, r) for n, r in plan if not isinstance(r, LeanRegion)]
    regions = [(n, r) for n, r in plan if isinstance(r, LeanRegion)] if recompute else []
    with contextlib.ExitStack() as stack:
        # the plan's size threshold, read by its shells and routed ops alike (one value per plan: its regions')
        threshold = max((r.min_elements for _, r in plan if isinstance(r, LeanRegion)), default=0)
        stack.enter_context(thresholded(threshold))
        stack.enter_context(_swapped(module, mods))
        if regions or (recompute and _recipes(plan)):
            # one layer of saved-tensor hooks for the whole block, not one per trainable subtree: what is frozen
            # saves nothing, and each region entered inside it then only routes ops (or does nothing)
            stack.enter_context(recompute_saved())
        for name, region in regions:  # after the swaps: a region's root may itself be a replacement
            if region.ops:
                for h in region.install(module.get_submodule(name)):
                    stack.callback(h.remove)
        _ACTIVE.append((module, plan))
        stack.callback(_ACTIVE.pop)
        yield module


class _Replay:
    """Re-enterable: checkpoint enters its recompute context once per recompute (retain_graph may recompute twice)."""

    def __init__(self, plans: list, region: bool):
        self.plans, self.region, self.open = plans, region, []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        try:
            for module, plan in self.plans:
                stack.enter_context(swapped(module, plan))
            if self.region:
                stack.enter_context(lean_region())
        except BaseException:
            stack.close()
            raise
        self.open.append(stack)

    def __exit__(self, *exc) -> None:
        self.open.pop().__exit__(*exc)


def replay() -> contextlib.AbstractContextManager:
    """A context manager that re-enters, later, the ``swapped`` plans open now (and the lean region if one runs
    now): ``torch.utils.checkpoint``'s recompute runs in backward, after the forward's ``swapped`` has closed,
    and must run the same modules and ops (``swapped`` puts the plan's size threshold back too) to save the same
    tensors."""
    return _Replay(list(_ACTIVE), in_region())
