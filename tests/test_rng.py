"""Per-member random streams."""

from __future__ import annotations

import torch

from fashionlab.rng import MemberGenerators, derive_seed

CPU = torch.device("cpu")


def test_derived_seeds_depend_on_every_key_and_nothing_else():
    assert derive_seed(0, "dense(64)", 3) == derive_seed(0, "dense(64)", 3)
    assert len({derive_seed(0, "a", 1), derive_seed(0, "a", 2), derive_seed(1, "a", 1)}) == 3
    assert 0 <= derive_seed(7, "x") < 2**63


def test_a_member_draws_the_same_numbers_in_any_stack():
    alone = MemberGenerators([11], CPU)
    stacked = MemberGenerators([5, 11, 9], CPU)
    torch.testing.assert_close(stacked.rand(4, 3)[1], alone.rand(4, 3)[0])
    assert torch.equal(stacked.bits16(7, 5, members=[1])[0], alone.bits16(7, 5)[0])
    assert torch.equal(stacked.randperm(50)[1], alone.randperm(50)[0])


def test_bits16_covers_all_16_bit_values_uniformly():
    bits = MemberGenerators([0], CPU).bits16(400_000)[0].long() + 32768  # (n,) in [0, 65536)
    assert bits.dtype == torch.long and 0 <= bits.min() and bits.max() < 65536
    # Each of the 16 bits is set half the time (the top bit too: the draws use all 64 bits).
    for bit in range(16):
        share = ((bits >> bit) & 1).float().mean().item()
        assert abs(share - 0.5) < 0.005, bit
    counts = torch.bincount(bits >> 12, minlength=16).float()  # 16 equal bins
    assert (counts / counts.mean() - 1).abs().max() < 0.03
