"""The pure geometry behind shard-aware snapshots, in one process (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from weibull_monitor import distributed
from weibull_monitor.distributed import shards as _shards
from weibull_monitor.distributed.collective import deal_owners


def covered(view: torch.Tensor, shape: tuple[int, int]) -> set[tuple[int, int]]:
    rows, cols = _shards.view_rows_cols(view, torch.Size(shape))
    return {(r, c) for r in rows.tolist() for c in cols.tolist()}


def elements_of(view_of_index: torch.Tensor, cols: int) -> set[tuple[int, int]]:
    return {divmod(int(i), cols) for i in view_of_index.reshape(-1)}


@pytest.mark.parametrize(
    "make_view",
    [
        lambda w: w[4:8],  # a block of rows (concatenated Q/K/V)
        lambda w: w.view(3, 4, 6)[:, 1:3],  # rows 1-2 of each of 3 heads (per-head interleaved QKV)
        lambda w: w[:, 2:4].T,  # a block of columns, transposed (GPT-2 Conv1D c_attn)
        lambda w: w,
    ],
)
def test_view_rows_cols_finds_exactly_the_elements_of_a_strided_view(make_view):
    index = torch.arange(12 * 6).reshape(12, 6)
    view_of_index = make_view(index)
    meta_view = make_view(torch.empty(12, 6, device="meta"))
    assert covered(meta_view, (12, 6)) == elements_of(view_of_index, 6)


def test_a_view_that_is_no_row_by_column_product_is_skipped_not_guessed():
    diagonal = torch.empty(6, 6, device="meta").as_strided((6,), (7,))
    with pytest.raises(_shards.Skip) as raised:
        _shards.view_rows_cols(diagonal, torch.Size((6, 6)))
    assert raised.value.code == _shards.SKIP_LAYOUT


def test_runs_are_maximal_and_clipped_to_the_shard():
    idx = torch.tensor([0, 1, 2, 5, 6, 9])
    assert _shards.runs(idx, 0, 10) == [(0, 3), (5, 7), (9, 10)]
    assert _shards.runs(idx, 2, 6) == [(2, 3), (5, 6)]
    assert _shards.runs(idx, 3, 5) == []


def zero3_standin(weight: torch.Tensor, rank: int, world: int) -> torch.nn.Parameter:
    flat = weight.reshape(-1)
    size = -(-flat.numel() // world)
    part = torch.full((size,), 1.0e6)
    valid = max(0, min(size, flat.numel() - rank * size))
    part[:valid] = flat[rank * size : rank * size + valid]
    part.ds_numel = size
    param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    param.ds_tensor, param.ds_numel, param.ds_shape, param.ds_process_group = (
        part,
        flat.numel(),
        weight.shape,
        None,
    )
    return param


def test_a_zero3_partition_is_read_without_its_padding_and_cut_into_row_boxes():
    # Without a process group the partition is rank 0's: the first ceil(n/1) elements, i.e. everything here.
    weight = torch.randn(7, 5)
    param = zero3_standin(weight, rank=0, world=1)
    assert distributed.is_sharded(param) and distributed.global_shape(param) == torch.Size((7, 5))
    (share,) = _shards.local_share(param)
    assert torch.equal(share, weight.reshape(-1))
    boxes = _shards.local_boxes(param)
    assert [(b.r0, b.r1, b.c0, b.c1) for b in boxes] == [(0, 7, 0, 5)]


def test_flat_slices_break_mid_row_into_three_boxes():
    weight = torch.arange(35.0).reshape(7, 5)
    param = zero3_standin(weight, rank=0, world=1)
    start, stop = 8, 27  # row 1 cols 3-4, rows 2-4, row 5 cols 0-1
    boxes = _shards.flat_boxes(param, start, weight.reshape(-1)[start:stop])
    assert [(b.r0, b.r1, b.c0, b.c1) for b in boxes] == [(1, 2, 3, 5), (2, 5, 0, 5), (5, 6, 0, 2)]
    for box in boxes:
        assert torch.equal(box.local, weight[box.r0 : box.r1, box.c0 : box.c1])


def test_split_share_of_a_flat_partition_takes_only_the_component():
    weight = torch.randn(12, 4)
    param = zero3_standin(weight, rank=0, world=1)
    k_rows = torch.empty(12, 4, device="meta")[4:8]
    pieces = _shards.split_share(k_rows, param)
    assert torch.equal(torch.cat([p.reshape(-1) for p in pieces]), weight[4:8].reshape(-1))


def test_replicated_matrices_are_dealt_out_by_element_count():
    sizes = [100, 60, 50, 40, 10]
    owners = deal_owners(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert load == [140, 120]  # largest first to the least loaded: 100+40 | 60+50+10
    assert deal_owners(sizes, 2) == owners  # deterministic: every rank computes the same plan


def test_not_distributed_means_local_and_agree_is_the_flag_itself():
    assert distributed.is_active() is False
    assert distributed.agree(True) is True and distributed.agree(False) is False


def test_in_one_process_sharded_parameters_are_fitted_from_their_local_pieces():
    # A world of one (FSDP2 on a single GPU, a debugging run): the local pieces hold every element, so a sharded
    # parameter and its split parts fit exactly as the plain weight does, instead of being skipped.
    from weibull_monitor.estimator import fit_many

    weight = torch.randn(12, 40) * 0.02
    param = zero3_standin(weight, rank=0, world=1)
    matrix = distributed.matrix_of(param)
    assert isinstance(matrix, distributed.ShardedMatrix) and matrix.shape == weight.shape
    parts = matrix.split(lambda t: {"q": t[:4], "k": t[4:8], "v": t[8:]})
    assert all(isinstance(p, distributed.ShardedView) for p in parts.values())
    fits = distributed.fit_matrices(["w", *parts], [matrix, *parts.values()])
    expected = fit_many({"w": weight, "q": weight[:4], "k": weight[4:8], "v": weight[8:]})
    for key, fit in fits.items():
        assert fit.ok and fit.to_dict() == pytest.approx(expected[key].to_dict()), key
