"""One call of the wrapped model (its inputs walked once) and the cache keys of its samples: every input by
value, the ids or the content of each row, the augmentation drawn for it, the autocast state."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from . import _tree
from ._errors import CacheError

__all__ = ["Call", "Keys", "batch_size", "input_sig", "keys_of", "sig_text"]

_PRIMITIVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format)
_MIX = 1099511628211  # a 64-bit FNV prime: int64 arithmetic wraps, so products and sums mix keys


class Call:
    """One call of the wrapped model, its inputs walked once (``_tree``): every later question reads this."""

    def __init__(
        self, args: tuple, kwargs: dict, cache_ids: Any = None, cache_aug: Any = None, target: Callable | None = None
    ):
        self.args, self.kwargs, self.cache_ids, self.cache_aug = args, kwargs, cache_ids, cache_aug
        self.leaves, self.spec = _tree.flatten((args, kwargs))
        self.tensors = [v for v in self.leaves if isinstance(v, torch.Tensor)]
        # An input that needs a gradient (saliency, adversarial examples) runs the model as naive freezing would.
        self.grad_in = torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors)
        self.single_tensor = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        # what runs the model's forward for this call: the model (its hooks fire; None), or, when the wrapper
        # called the model itself so that hooks on it fire once, its forward without them
        self.target = target

    def kind(self, training: bool) -> tuple:
        """What a recorded plan depends on: containers, keyword names, tensor ranks and dtypes, other types; the
        model's mode, grad and inference mode (what reads a frozen output, and what needs its gradient, can
        differ between training and validation); whether the batch has more than one sample (with one, a
        tensor shared by the batch cannot be told from a per-sample one)."""
        batch = batch_size(self.args, self.kwargs) or 0
        return (
            _tree.structure(self.leaves, self.spec),
            training,
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            batch > 1,
        )

    def run(self, fn: Callable[..., Any]) -> Any:
        return fn(*self.args, **self.kwargs)


class Keys(NamedTuple):
    """The cache's view of one call: its batch size, the shape signature its rows are stored under (a layout of
    their own), one int64 key per sample and, with ``cache_ids``, each sample's content hash."""

    batch: int
    sig: tuple
    keys: torch.Tensor
    content: torch.Tensor | None
    device: torch.device


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The number of samples in a call: the length of a list of tensors passed first (torchvision detection's
    images), else the rows of the first tensor."""
    if args and isinstance(args[0], (list, tuple)) and args[0] and all(isinstance(t, torch.Tensor) for t in args[0]):
        return len(args[0])
    return next((t.shape[0] for t in _tree.tensors((args, kwargs)) if t.dim() > 0), None)


def keys_of(call: Call) -> Keys:
    """The cache keys of ``call``'s samples.

    A key covers every input of the call: batch-first tensors row by row (or, for a list of samples, the i-th
    element of every list of that length), everything else (tensors of another size, scalars, strings, the call's
    structure, the autocast dtype) by value, mixed into every row's key. An input that cannot be keyed by value is
    refused: a cache must never serve rows computed from other inputs. With ``cache_ids`` the ids are the keys and
    the content hash goes beside each row, so a changed input (augmentation) is seen. ``cache_aug`` (one value per
    sample: the augmentation drawn for it) is mixed into its key: each variant of a sample is a row of its own.
    """
    from ._native import hash_rows

    tensors = [t for t in call.tensors if t.dim() > 0]
    if not tensors:
        raise CacheError("the cache keys samples by their input tensors, but this call passed none")
    batch = batch_size(call.args, call.kwargs)
    samples = _sample_lists(call.args, batch)
    if samples:  # a list of samples: sample i is the i-th element of each such list
        inside = {id(t) for lst in samples for t in _tree.tensors(lst)}
        others = [t for t in call.tensors if id(t) not in inside]
        content = torch.tensor([_hash_sample([lst[i] for lst in samples], hash_rows) for i in range(batch)])
        sig = input_sig(list(samples[0]), per_sample=False)
    else:
        rows = [t for t in tensors if t.shape[0] == batch]
        others = [t for t in call.tensors if t.dim() == 0 or t.shape[0] != batch]
        content = None
        for t in rows:
            r = hash_rows(t).cpu()
            content = r if content is None else content * _MIX + r
        sig = input_sig(rows)
    amp = _autocast(tensors[0].device.type)  # rows computed under autocast are other rows
    plain = (
        not samples
        and not others
        and not call.kwargs
        and not amp
        and all(isinstance(a, torch.Tensor) for a in call.args)
    )
    glob = None if plain else _digest(call, others, hash_rows, amp)
    if glob is not None:  # other inputs reach the model: they are part of every sample's key
        content = content * _MIX + glob
    aug = None if call.cache_aug is None else _aug_keys(call.cache_aug, batch, hash_rows)
    device = tensors[0].device
    if call.cache_ids is None:
        return Keys(batch, sig, content if aug is None else content * _MIX + aug, None, device)
    from .cache import ids_to_keys

    ids = ids_to_keys(call.cache_ids, "cache_ids")
    if ids.numel() != batch:
        raise CacheError(
            f"cache_ids hold {ids.numel()} id(s) for a batch of {batch}; pass one integer id per sample "
            "(the dataset indices of the batch)"
        )
    key = ids.to(torch.int64).cpu()
    if glob is not None:
        key = key * _MIX + glob
    if aug is not None:
        key = key * _MIX + aug
    return Keys(batch, sig, key, content, device)


def _sample_lists(args: tuple, batch: int | None) -> list:
    """The positional lists of one element per sample (images, targets), when the first argument is one."""
    if not (args and isinstance(args[0], (list, tuple)) and len(args[0]) == batch):
        return []
    return [a for a in args if isinstance(a, (list, tuple)) and len(a) == batch]


def _hash_sample(parts: list, hash_rows) -> int:
    h = hashlib.blake2b(digest_size=8)
    for t in _tree.tensors(parts):
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(int(hash_rows(t.reshape(1, -1).contiguous()).cpu()[0]).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little", signed=True)


def _autocast(device_type: str) -> str | None:
    """The autocast dtype in force for ``device_type`` (None when autocast is off)."""
    try:
        on = torch.is_autocast_enabled(device_type)
        return str(torch.get_autocast_dtype(device_type)) if on else None
    except (TypeError, AttributeError):  # torch < 2.4
        on = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
        return "autocast" if on else None


def _digest(call: Call, others: list[torch.Tensor], hash_rows, amp: str | None) -> int:
    """One int64 for everything in the call that is not a batch row: the structure, every plain value, each
    tensor of another size (hashed whole) and the autocast dtype; a value that cannot be keyed is refused."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(call.spec).encode())
    h.update(f"autocast:{amp};".encode())
    for i, v in enumerate(call.leaves):
        if isinstance(v, torch.Tensor):
            h.update(b"T")
        elif isinstance(v, _PRIMITIVES):
            h.update(f"{type(v).__name__}:{v!r};".encode())
        else:
            path = pytree.keystr(pytree.tree_flatten_with_path((call.args, call.kwargs))[0][i][0])
            raise CacheError(
                f"the cache cannot key input{path} of type {type(v).__name__}: every input reaching the model is "
                "part of a sample's key; pass it as a tensor or a plain value (number, string), or drop cache="
            )
    for t in others:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(int(hash_rows(t.reshape(1, -1)).cpu()[0]).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little", signed=True)


def _aug_keys(aug: Any, batch: int, hash_rows) -> torch.Tensor:
    """One int64 per sample for ``cache_aug``: a batch-first tensor (hashed row by row) or a sequence of plain
    values (an int, a string, a tuple of numbers: the augmentation drawn for each sample)."""
    if isinstance(aug, torch.Tensor):
        if aug.dim() == 0 or aug.shape[0] != batch:
            raise CacheError(
                f"cache_aug has shape {tuple(aug.shape)} for a batch of {batch}; pass one row per sample (batch-first)"
            )
        return hash_rows(aug.detach().reshape(batch, -1).contiguous()).cpu()
    items = list(aug) if isinstance(aug, (list, tuple)) else None
    if items is None or len(items) != batch:
        raise CacheError(
            f"cache_aug={_short(aug)} is not one value per sample of a batch of {batch}; pass a batch-first tensor or "
            "a list of plain values (the augmentation each sample got, e.g. (flip, crop_x, crop_y))"
        )
    out = []
    for v in items:
        if not _plain(v):
            raise CacheError(
                f"cache_aug holds a {type(v).__name__}, which the cache cannot key by value; pass numbers, strings, "
                "or tuples of them"
            )
        h = hashlib.blake2b(repr(v).encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "little", signed=True))
    return torch.tensor(out, dtype=torch.int64)


def _plain(v: Any) -> bool:
    return isinstance(v, _PRIMITIVES) or (isinstance(v, tuple) and all(_plain(x) for x in v))


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def input_sig(tensors: list[torch.Tensor], per_sample: bool = True) -> tuple:
    """Per-sample shape and dtype of each batch input (each whole tensor's for a list of samples), and the autocast
    dtype in force: what the boundary's shapes and dtypes, and so the cache's layout, depend on."""
    amp = _autocast(tensors[0].device.type) if tensors else None
    shapes = ((tuple(t.shape[1:] if per_sample else t.shape), t.dtype) for t in tensors)
    return (*shapes, ("autocast", amp))


def sig_text(sig) -> str:
    parts = [f"{list(shape)} {str(dt).replace('torch.', '')}" for shape, dt in sig if shape != "autocast"]
    amp = dict((k, v) for k, v in sig if k == "autocast").get("autocast")
    return ", ".join(parts) + (f" (autocast {str(amp).replace('torch.', '')})" if amp else "")
