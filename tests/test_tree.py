"""The one walk over nested values (``freezert._tree``) and the lean routing's flattening of an op's arguments: the
fast paths that leave no garbage give exactly what ``torch.utils._pytree`` gives, and hand anything else to it."""

from __future__ import annotations

import collections
import gc

import torch
import torch.utils._pytree as pytree

from freezert import _tree
from freezert.ops import lean

Pair = collections.namedtuple("Pair", "a b")


def _values():
    t = [torch.full((1,), float(i)) for i in range(6)]
    return [
        t[0],
        (t[0], t[1]),
        [t[0], 3, None, "s", 1.5],
        ((t[0], [t[1], {"k": t[2], "j": (t[3],)}]), {"x": t[4], "a": t[5]}),
        {"b": t[1], "a": [t[0], t[2]]},  # insertion order, as pytree keeps it
        (Pair(t[0], t[1]), t[2]),  # a namedtuple inside: pytree's walk
        (torch.Size([2, 3]), t[0]),
        (torch.nn.Parameter(t[3]), t[4]),
        (),
    ]


def test_tensors_and_map_tensors_agree_with_pytree_on_every_nesting():
    for v in _values():
        want = [x for x in pytree.tree_flatten(v)[0] if isinstance(x, torch.Tensor)]
        got = _tree.tensors(v)
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want)), v
        mapped = _tree.map_tensors(v, lambda x: x + 10)
        ref = pytree.tree_map(lambda x: x + 10 if isinstance(x, torch.Tensor) else x, v)
        leaves, spec = pytree.tree_flatten(mapped)
        ref_leaves, ref_spec = pytree.tree_flatten(ref)
        assert spec == ref_spec and type(mapped) is type(ref)
        for a, b in zip(leaves, ref_leaves):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_the_lean_flattening_round_trips_an_ops_arguments():
    x, y = torch.ones(2), torch.zeros(2)
    cases = [
        ((x, y), {}),
        (([x, y],), {"dim": 0}),
        (((x, y), 1), {}),
        ((x, 2.0), {"alpha": 3}),
        (([x, [y]],), {}),  # deeper: pytree's
        ((x,), {"out": None, "other": {"t": y}}),  # a dict value: pytree's
    ]
    for args, kwargs in cases:
        leaves, spec = lean._flatten(args, kwargs)
        want = pytree.tree_flatten((args, kwargs))[0]
        assert len(leaves) == len(want) and all(a is b for a, b in zip(leaves, want))
        a2, k2 = lean._unflatten(list(leaves), spec)
        assert pytree.tree_flatten((a2, k2))[1] == pytree.tree_flatten((args, kwargs))[1]


def test_the_walks_leave_no_cyclic_garbage():
    v = ((torch.ones(1), [torch.ones(1)]), {"a": torch.ones(1)})
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for _ in range(200):
            _tree.tensors(v)
            _tree.map_tensors(v, lambda t: t)
            lean._unflatten(*lean._flatten((v[0][0], 1), {"dim": 0}))
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    # pytree.tree_flatten alone leaves about 7 objects per call (1485 for 200 calls here)
    assert grown < 200, f"{grown} container objects outlived 200 rounds of three walks"
