"""One byte-size grammar for every budget of the package (cache tiers and memory_budget alike)."""

import math

import pytest
import torch

import freezert
from freezert import CacheError, FeatureCache, FreezeError
from freezert._units import fmt_bytes, parse_bytes


def test_sizes_parse_the_same_everywhere():
    assert parse_bytes("b", 4096) == 4096
    assert parse_bytes("b", "512MiB") == parse_bytes("b", "512 MiB") == 512 * 2**20
    assert parse_bytes("b", "1.5 GB") == parse_bytes("b", "1.5GB") == 1_500_000_000
    assert parse_bytes("b", "4G") == 4 * 10**9 and parse_bytes("b", "4GiB") == 4 * 2**30
    assert parse_bytes("b", ".5KiB") == 512
    assert parse_bytes("b", None, allow_none=True) == math.inf == parse_bytes("b", "unlimited", allow_none=True)


@pytest.mark.parametrize("bad", ["4 gigs", -1, True, None, float("nan"), "1e3", 2**63, [4]])
def test_a_bad_size_names_the_argument_and_the_value(bad):
    with pytest.raises(FreezeError, match=r"^budget=.* (is not a size|is more than 2\*\*62 bytes)"):
        parse_bytes("budget", bad)


def test_the_error_type_follows_the_caller():
    with pytest.raises(CacheError, match="host_budget='lots'"):
        FeatureCache(host_budget="lots")
    # memory_budget takes what the cache takes ("4G" was refused there before): one grammar
    lin = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
    fm = freezert.wrap(lin, freeze=1, memory_budget="4G")
    try:
        assert fm.freeze_config.memory_budget == 4 * 10**9
    finally:
        fm.unwrap()
    with pytest.raises(FreezeError, match="memory_budget='lots' is not a size"):
        freezert.wrap(lin, freeze=1, memory_budget="lots")


def test_format():
    assert fmt_bytes(44) == "44 B"
    assert fmt_bytes(1536) == "1.50 KiB"
    assert fmt_bytes(3 * 2**30) == "3.00 GiB"
    assert fmt_bytes(math.inf) == "unlimited"
