"""The record on tiny graphs: what one observed forward says about call order, the stem, gradients and readers."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from freezert.blocks import block_table
from freezert.record import OUTSIDE, record


class Chain(nn.Module):
    """``embed`` (registered after the blocks, runs first) -> blocks 0..2 -> ``head``; block 1's output also goes
    straight to the head (a skip), and block 2 is called twice when ``twice``."""

    def __init__(self, twice: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(8, 2)
        self.embed = nn.Linear(3, 4)
        self.twice = twice

    def forward(self, x):
        h = self.embed(x)
        a = self.blocks[0](h)
        b = self.blocks[1](a)
        c = self.blocks[2](b)
        if self.twice:
            c = self.blocks[2](c)
        return self.head(torch.cat([b, c], -1))


def _record(model, frozen, x, train=()):
    table = block_table(model)
    keep = {id(p) for n, p in model.named_parameters() if n.startswith(tuple(train))}
    rec, out = record(model, table, set(frozen), (x,), {}, keep)
    return table, rec, out


def test_call_order_and_stem_come_from_the_forward_not_registration():
    model = Chain()
    table, rec, _ = _record(model, [0, 1], torch.randn(2, 3), train=["head", "blocks.2"])
    assert table.names == ["blocks.0", "blocks.1", "blocks.2"]
    assert rec.before_first_block == {"embed"}  # registered last, ran first: the stem
    assert rec.first_call["embed"] < rec.first_call["blocks.0"] < rec.first_call["head"]
    units = {n: len(table) + c for c, (n, _) in enumerate(table.candidates)}  # stem/head candidates: units too
    assert rec.block_calls == {0: 1, 1: 1, 2: 1, units["embed"]: 1, units["head"]: 1}


def test_readers_of_frozen_outputs_are_seen_by_op_not_by_module():
    model = Chain()
    table, rec, _ = _record(model, [0, 1], torch.randn(2, 3), train=["head", "blocks.2"])
    # block 0's output is read only by block 1; block 1's by block 2 and by the glue code's cat (outside)
    assert rec.consumers[(0, 0, 0)] == {1}
    assert rec.consumers[(1, 0, 0)] == {2, OUTSIDE}
    assert rec.boundary({0, 1}) == [(1, 0, 0)]  # what a cache of blocks 0..1 must store
    assert rec.out_is_batch[(1, 0, 0)]


def test_gradient_dependence_marks_inputs_and_inside_reads():
    class RootParam(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(4))
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            x = self.blocks[0](x) + self.token  # glue adds a trainable root parameter
            return self.blocks[2](self.blocks[1](x))

    model = RootParam()
    table = block_table(model)
    keep = {id(model.token), *map(id, model.blocks[2].parameters())}
    rec, _ = record(model, table, {0, 1}, (torch.randn(2, 4),), {}, keep)
    assert not rec.grad_in.get(0) and rec.grad_in.get(1)  # block 1's input depends on the token
    # nothing flows into block 0 from a trainable source, and it reads nothing trainable inside
    assert not rec.grad_inside.get(0)


def test_a_block_called_twice_is_counted_and_planned_eager():
    from freezert.partition import plan

    model = Chain(twice=True)
    table, rec, _ = _record(model, [0, 1, 2], torch.randn(2, 3), train=["head"])
    assert rec.block_calls[2] == 2
    assert "runs 2 times" in plan(table, rec, [0, 1, 2], 3, []).eager[2]


def test_outputs_inside_a_dataclass_are_tracked():
    @dataclasses.dataclass
    class Out:
        hidden: torch.Tensor
        note: str = "x"

    class Wrapped(nn.Linear):
        def forward(self, x):
            return Out(super().forward(x))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Wrapped(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x):
            h = self.blocks[0](x).hidden
            return self.blocks[2](self.blocks[1](h))

    model = M()
    table = block_table(model)
    rec, _ = record(model, table, {0}, (torch.randn(2, 4),), {}, set())
    # the tensor inside the dataclass is tracked (an attribute read is no op: block 1 is its reader)
    assert rec.consumers[(0, 0, 0)] == {1} and rec.out_is_batch[(0, 0, 0)]


def test_the_record_is_invisible():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).train()

    class Holder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    holder = Holder(model)
    before = {k: v.clone() for k, v in holder.state_dict().items()}
    flags = [p.requires_grad for p in holder.parameters()]
    x = torch.randn(5, 3)
    state = torch.random.get_rng_state()
    record(holder, block_table(holder), {0}, (x,), {}, set())
    assert all(torch.equal(before[k], v) for k, v in holder.state_dict().items())  # BN statistics restored
    assert [p.requires_grad for p in holder.parameters()] == flags
    assert torch.equal(torch.random.get_rng_state(), state)  # dropout drew from a forked RNG
