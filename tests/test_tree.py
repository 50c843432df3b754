"""The one walk over nested values (``freezert._tree``: calls, block outputs, the lean routing's operands): its own
walk of plain nests, which leaves no garbage, gives exactly what ``torch.utils._pytree`` gives, and hands anything
else to it."""

from __future__ import annotations

import collections
import gc

import torch
import torch.utils._pytree as pytree

from freezert import _tree

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


def test_flatten_round_trips_and_its_structure_keys_a_call():
    """Leaves in pytree's order, the value rebuilt as it was, and a structure that is hashable and equal exactly
    when the nesting is (a plan is keyed by it); pytree's own structure for what the plain walk does not take."""
    x, y = torch.ones(2), torch.zeros(2)
    cases = [
        ((x, y), {}),
        (([x, y],), {"dim": 0}),
        (((x, y), 1), {}),
        ((x, 2.0), {"alpha": 3}),
        (([x, [y]],), {}),
        ((x,), {"out": None, "other": {"t": y}}),
        ((Pair(x, y),), {}),  # pytree's
    ]
    specs = []
    for args, kwargs in cases:
        leaves, spec = _tree.flatten((args, kwargs))
        want, want_spec = pytree.tree_flatten((args, kwargs))
        assert len(leaves) == len(want) and all(a is b for a, b in zip(leaves, want))
        back = _tree.unflatten(list(leaves), spec)
        assert pytree.tree_flatten(back)[1] == want_spec
        hash(_tree.structure(leaves, spec))
        specs.append(spec)
    assert isinstance(specs[-1], pytree.TreeSpec) and not isinstance(specs[0], pytree.TreeSpec)
    assert _tree.flatten(((y, x), {}))[1] == specs[0]  # same nesting, other tensors: same structure
    assert len(set(specs[:-1])) == len(specs) - 1  # every other nesting: another structure


def test_the_walks_leave_no_cyclic_garbage():
    v = ((torch.ones(1), [torch.ones(1)]), {"a": torch.ones(1)})
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for _ in range(200):
            _tree.tensors(v)
            _tree.map_tensors(v, lambda t: t)
            _tree.unflatten(*_tree.flatten(((v[0][0], 1), {"dim": 0})))
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    # pytree.tree_flatten alone leaves about 7 objects per call (1485 for 200 calls here)
    assert grown < 200, f"{grown} container objects outlived 200 rounds of three walks"
