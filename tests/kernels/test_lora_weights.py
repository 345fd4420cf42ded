"""LoraWeights: host and device slot tables stay one set of values, and the per-slot plans follow every change."""

import pytest
import torch

from lora_server.kernels.lora_weights import LoraWeights, SliceTerm

OFFSETS = (0, 40, 52, 64)  # q, k, v


def assert_tables_agree(weights: LoraWeights) -> None:
    assert weights.device_row_starts.dtype == weights.device_ranks.dtype == torch.int32
    assert weights.device_row_starts.tolist() == weights.row_starts
    assert weights.device_ranks.tolist() == [list(r) for r in weights.ranks]
    assert weights.device_scales.dtype == torch.float32
    assert weights.device_scales.tolist() == [list(s) for s in weights.scales]  # exactly: the scales below are dyadic
    assert weights.device_slice_offsets.tolist() == list(OFFSETS)
    assert weights.max_rank == max((max(r) for r in weights.ranks), default=0)
    for slot in range(weights.num_slots):
        plan = weights.plan(slot)
        assert plan.row_start == weights.row_starts[slot] and plan.max_rank == max(weights.ranks[slot])
        ranks_scales = zip(weights.ranks[slot], weights.scales[slot], strict=True)
        assert plan.terms == tuple(SliceTerm(k, r, s, OFFSETS[k], OFFSETS[k + 1], bt=None)
                                   for k, (r, s) in enumerate(ranks_scales) if r)
        # The views are the slot's rows of the pool itself.
        row, max_rank = plan.row_start, plan.max_rank
        assert torch.equal(plan.a, weights.lora_a[:, row : row + max_rank].transpose(1, 2))
        assert max_rank == 0 or plan.a.data_ptr() == weights.lora_a[:, row:].data_ptr()
        for term in plan.terms:
            assert torch.equal(term.bt, weights.lora_bt[row : row + term.rank, term.lo : term.hi])
            assert term.bt.data_ptr() == weights.lora_bt[row:, term.lo :].data_ptr()


def test_slot_changes_update_every_table():
    weights = LoraWeights.allocate(3, 40, 16, OFFSETS, num_slots=4, dtype=torch.float32, device=torch.device("cpu"))
    assert weights.max_rank == 0 and all(not weights.plan(slot).terms for slot in range(4))
    assert_tables_agree(weights)
    weights.set_slot(1, 8, [8, 0, 4], [0.5, 0.0, 2.0])
    weights.set_slot(3, 20, [16, 16, 16], [0.25, 0.25, 0.25])
    assert weights.plan(1).terms == (SliceTerm(0, 8, 0.5, 0, 40, bt=None), SliceTerm(2, 4, 2.0, 52, 64, bt=None))
    assert weights.max_rank == 16
    assert_tables_agree(weights)
    weights.alias_slot(2, 1, scale_factor=-1.0)
    assert weights.row_starts[2] == 8 and weights.ranks[2] == (8, 0, 4) and weights.scales[2] == (-0.5, 0.0, -2.0)
    assert_tables_agree(weights)
    weights.clear_slot(3)
    assert weights.max_rank == 8 and weights.row_starts[3] == 20 and not weights.plan(3).terms
    assert_tables_agree(weights)


def test_a_slot_must_fit_the_pool():
    weights = LoraWeights.allocate(1, 10, 4, (0, 4), num_slots=2, dtype=torch.float32, device=torch.device("cpu"))
    weights.set_slot(0, 2, [8], [1.0])
    with pytest.raises(AssertionError, match="run past the pool"):
        weights.set_slot(1, 3, [8], [1.0])
