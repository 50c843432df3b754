"""The plan on tiny graphs: partition of a YOLO-style graph, eager blocks and their causes, the cached part and
its boundary, and the segment built from a plan."""

from __future__ import annotations

import torch
import torch.nn as nn

from freezert.blocks import BlockTable, block_table
from freezert.config import FreezeConfig
from freezert.partition import partition, plan
from freezert.record import record
from freezert.segment import FrozenSegment


class Routed(nn.Module):
    """A YOLO-style layer: ``f`` says which earlier outputs it reads (-1: the previous one)."""

    def __init__(self, f, i):
        super().__init__()
        self.f, self.i = f, i

    def forward(self, x):
        return sum(x) if isinstance(x, list) else x + 1


def _yolo_table(fs) -> BlockTable:
    model = nn.Module()
    model.model = nn.Sequential(*[Routed(f, i) for i, f in enumerate(fs)])
    return block_table(model)


def test_partition_of_a_routed_graph_keeps_what_the_tail_reads_and_frees_the_rest():
    #            0   1   2        3   4        5
    t = _yolo_table([-1, -1, -1, [-1, 1], -1, [-1, 0]])
    assert t.kind == "yolo"
    p = partition(t, [0, 1, 2, 3], 4)
    assert p.boundary == (0, 3)  # block 5 reads 0; block 4 reads 3
    dead = {j for v in p.free_after.values() for j in v}
    assert dead == {1, 2}  # 1 after block 3 read it, 2 after block 3
    assert 1 in p.free_after[3] and 2 in p.free_after[3]
    assert partition(t, list(range(6)), 6).boundary == (5,)  # every block: the model's output is handed on


def test_a_chain_partition_hands_on_the_last_prefix_output():
    t = block_table(nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)]))
    p = partition(t, [0, 1], 2)
    assert p.boundary == (1,) and p.free_after == {1: (0,)}


class Glue(nn.Module):
    """Blocks 0..3; a trainable root parameter joins after block 1; block 2's output has no batch dimension."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        a = self.blocks[0](x)
        b = self.blocks[1](a) + self.bias
        return self.blocks[3](self.blocks[2](b))


def _plan(model, frozen, k, x, keep_names):
    table = block_table(model)
    keep = {id(p) for n, p in model.named_parameters() if n.startswith(tuple(keep_names))}
    rec, _ = record(model, table, set(frozen), (x,), {}, keep)
    return table, plan(table, rec, frozen, k, [])


def test_blocks_that_need_autograd_run_eagerly_with_their_cause():
    table, p = _plan(Glue(), [0, 1, 2], 3, torch.randn(2, 4), ["bias", "blocks.3"])
    assert set(p.eager) == {2} and "bias" in p.eager[2]  # block 2's input depends on the trainable bias
    assert p.segment == (0, 1)
    assert p.cached == 2 and p.cached_units == (0, 1)
    assert p.replay == ((1, 0, 0),)  # block 1's output is what the trainable part reads


def test_a_shared_unbatched_output_leaves_the_cache_and_its_readers_become_boundary():
    class PosBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Linear(4, 4)
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            p = self.blocks[0](torch.ones(1, 4))  # shared by the batch: (1, 4)
            h = self.blocks[1](x) + p
            return self.blocks[2](h)

    model = PosBias()
    table = block_table(model)
    rec, _ = record(model, table, {0, 1}, (torch.randn(3, 4),), {}, set())
    p = plan(table, rec, [0, 1], 2, [])
    assert 0 in p.unbatched and 0 not in p.cached_units
    assert p.cached_units == (1,) and p.replay == ((1, 0, 0),)


def test_the_segment_built_from_a_plan_folds_and_runs_the_prefix():
    torch.manual_seed(0)

    def cbr(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(cbr(3, 4), cbr(4, 4), nn.Flatten()).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    table = block_table(model)
    part = partition(table, [0, 1], 2)
    entries = [((i, 0), table.names[i], table.modules[i]) for i in range(2)]
    seg = FrozenSegment(table, part, entries, FreezeConfig(freeze=2))
    x = torch.randn(2, 3, 8, 8)
    y = seg.run(x)
    with torch.no_grad():
        ref = model[:2](x)
    assert list(y) == [1] and torch.allclose(y[1], ref, atol=1e-5)
    assert seg.folded == 2 and seg.prepared
    assert torch.allclose(seg.run(x)[1], ref, atol=1e-5)  # folded now: same values
    assert not seg.is_stale()
    with torch.no_grad():
        model[0][0].weight.mul_(2)  # an in-place edit of a frozen weight: the segment must be rebuilt
    assert seg.is_stale()
