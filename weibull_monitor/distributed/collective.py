"""Fits of a snapshot's matrices, in one process or collectively across ranks, without gathering a weight.

Histogram counts add across pieces of a matrix (docs/distributed.md), so no weight ever has to leave its rank:

- replicated matrices (DDP, or any plain tensor while a process group is up) are dealt out to ranks by element
  count, each rank histograms only its own ~1/world of the elements;
- sharded matrices (DTensor, ZeRO-3 partitions, registered FSDP1 slices) are histogrammed where they lie, each rank
  its local shard; split views of a sharded fused parameter from the slices of the local shard that fall in the
  component (:class:`~weibull_monitor.distributed.matrix.ShardedView`);

and one reduce-scatter SUM of a single ``[M, span]`` int32 tensor (int64 if some matrix has 2**31 elements or more),
where each rank filled only what it holds, completes every matrix at once: rank r receives the complete counts of
one block of M/world matrices and fits them; one all-gather of a small float64 table of fit fields shares the fits,
so every matrix is fitted once and every rank holds the same fits. Collectives per snapshot: one tiny fixed-size
all-reduce (list check, used code span, whether any rank skips; a second one with the skip codes only when some
rank skips), the reduce-scatter of the counts and the all-gather of the fits (plus an object all-gather only for
failed or exact fits).

Extra memory per rank: this rank's count rows cut to the codes they use (8 bytes x (used span + 2) per piece), the
``[M, span + 2]`` buffer that is reduced and the ``[M/world, span + 2]`` block it receives, plus slice-sized
temporaries; never a matrix, and never 256 KB per matrix.

:func:`fit_matrices` is the one entry point: every rank calls it at the same steps with the same list. Anything
that can fail locally fails before the first collective and becomes a skip code every rank agrees on, so no rank is
ever left waiting in a collective the others never reach.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from weibull_monitor.distributed import shards
from weibull_monitor.distributed.matrix import LocalMatrix, Matrix
from weibull_monitor.estimator import METHODS, WeibullFit, failed_fit, fit_many, fit_weibull
from weibull_monitor.estimator.histogram import (
    N_BINS,
    N_COLUMNS,
    CountBuffer,
    HistogramBatch,
    count_batch,
    fit_packed_counts,
    histogram_kind,
    pack_used_codes,
)
from weibull_monitor.estimator.record import FLOAT_FIELDS, INT_FIELDS

__all__ = ["agree", "fit_matrices", "is_active"]

log = logging.getLogger("weibull_monitor.distributed")

# Pieces histogrammed per call: bounds the engine's [pieces, N_COLUMNS] temporary while keeping small matrices batched.
_PIECES_PER_CALL = 32


def fit_matrices(
    keys: Sequence[str], matrices: Sequence[Matrix], method: str = "histogram"
) -> dict[str, WeibullFit]:
    """Fit every matrix: key -> WeibullFit, in order. Never raises for a matrix (unreadable ones get a not-ok fit
    with the reason); ValueError for an unknown ``method``.

    Under torch.distributed with more than one rank this is a collective: every rank must call it at the same
    point with the same keys and global shapes, and every rank gets the same fits. ``method="exact"`` fits
    replicated matrices by a full sort on their owner rank; sharded matrices are always fitted from their summed
    histograms (no rank holds them whole) and say ``method="histogram"``.
    """
    if method not in METHODS:  # the same on every rank, so raising here cannot split the ranks
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if len(keys) != len(matrices):
        raise ValueError(f"{len(keys)} keys for {len(matrices)} matrices")
    with torch.no_grad():
        if is_active():
            return _fit_across_ranks(keys, matrices, method)
        return _fit_here(keys, matrices, method)


def _fit_here(keys: Sequence[str], matrices: Sequence[Matrix], method: str) -> dict[str, WeibullFit]:
    """One process: plain tensors through ``fit_many``; sharded ones (a world of one, e.g. FSDP2 on one GPU) from
    the histograms of their local pieces, which then hold every element."""
    local = {key: m.tensor for key, m in zip(keys, matrices) if isinstance(m, LocalMatrix)}
    fits = fit_many(local, method=method)
    sharded = [(i, key) for i, key in enumerate(keys) if key not in local]
    if sharded:
        index = [i for i, _ in sharded]
        pieces, skip_codes = _read_pieces(
            [k for _, k in sharded], [matrices[i] for i in index], [0] * len(index), 0
        )
        rows = [_summed_counts(p) for p, code in zip(pieces, skip_codes) if not code]
        kinds = [histogram_kind(matrices[i].dtype) for i, code in zip(index, skip_codes) if not code]
        fitted = iter(HistogramBatch(torch.stack(rows), kinds).fit_all() if rows else [])
        for (_, key), code in zip(sharded, skip_codes):
            fits[key] = failed_fit(shards.SKIP_REASONS[code], "histogram") if code else next(fitted)
    return {key: fits[key] for key in keys}


def _summed_counts(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """One int64 [N_COLUMNS] count row (on the CPU) of all the pieces of a matrix: counts add."""
    total = torch.zeros(N_COLUMNS, dtype=torch.int64)
    for start in range(0, len(pieces), _PIECES_PER_CALL):
        total += count_batch(pieces[start : start + _PIECES_PER_CALL]).counts.sum(0).cpu()
    return total


def _read_pieces(
    keys: Sequence[str], matrices: Sequence[Matrix], owners: Sequence[int], rank: int
) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Each matrix's local pieces on this rank, and a skip code per matrix (0 when readable). Never raises."""
    pieces: list[list[torch.Tensor]] = []
    skip_codes = [0] * len(keys)
    for i, matrix in enumerate(matrices):
        try:
            dtype = matrix.dtype
            if not dtype.is_floating_point or dtype.is_complex:
                raise shards.Skip(shards.SKIP_DTYPE)
            pieces.append(matrix.local_pieces(owners[i], rank))
        except shards.Skip as skip:
            skip_codes[i] = skip.code
            pieces.append([])
        except Exception as error:
            # A layout this module does not know: recorded, never fatal, never gathered.
            log.warning("weibull-monitor: cannot read the local share of %s: %r", keys[i], error)
            skip_codes[i] = shards.SKIP_FAILED
            pieces.append([])
    return pieces, skip_codes


def is_active() -> bool:
    """True when torch.distributed is initialised with more than one rank (then snapshots are collective)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """Where small collective tensors live: the current CUDA device for NCCL, else the CPU (gloo, mpi, ccl)."""
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flag: bool) -> bool:
    """Collective logical OR of ``flag`` over all ranks (one all-reduce MAX); ``flag`` itself when not distributed.

    Every rank must call it at the same point (e.g. the stop decision after a snapshot): if any rank wants to stop,
    all ranks stop at the same step.
    """
    if not is_active():
        return bool(flag)
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def deal_owners(sizes: Sequence[int], world: int) -> list[int]:
    """Deal matrices to ranks, largest first, each to the least-loaded rank (deterministic: same on every rank)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += sizes[index]
    return owner


def _signature(keys: Sequence[str], matrices: Sequence[Matrix]) -> int:
    """A CRC of keys and global shapes: every rank must hold the same matrix list for the collectives to line up."""
    text = ";".join(f"{key}|{tuple(m.shape)}" for key, m in zip(keys, matrices))
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _fit_across_ranks(keys: Sequence[str], matrices: Sequence[Matrix], method: str) -> dict[str, WeibullFit]:
    """Fit every matrix across all ranks; collective, the result is identical on every rank.

    ``keys`` and ``matrices`` must be the same lists, in the same order, on every rank. Each matrix is counted where its elements lie, the counts are summed with one reduce-scatter (so
    rank r receives the complete counts of one block of matrices), each rank fits its block, and one all-gather
    of a float64 table of fit fields shares the fits: every matrix is fitted once, and every rank returns the same fits.

    ``method="exact"`` fits replicated matrices by a full sort on their owner rank; sharded matrices are always
    fitted from their summed histograms (no rank holds them whole) and say ``method="histogram"``. Matrices that
    cannot be read without gathering get a not-ok fit with the reason, on every rank.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    replicated = [isinstance(m, LocalMatrix) for m in matrices]
    owners = deal_owners([m.numel if r else 0 for m, r in zip(matrices, replicated)], world)
    n = len(keys)
    pieces, skip_codes = _read_pieces(keys, matrices, owners, rank)

    # All local work that could fail happens before the first collective: a failure becomes a skip code that the
    # header below makes every rank agree on, so no rank is left waiting in a collective the others never reach.
    exact = method == "exact"
    device = _collective_device()
    wanted = [not skip_codes[i] and not (exact and replicated[i]) for i in range(n)]
    # A count never exceeds its matrix's element count, so int32 is exact below 2**31 elements per matrix and halves
    # what is kept and what the reduce-scatter moves. Decided from global shapes: the same on every rank.
    largest = max((m.numel for m in matrices), default=0)
    count_dtype = torch.int32 if largest < 2**31 else torch.int64
    batches = _local_counts(pieces, wanted, device, skip_codes, keys, count_dtype)

    # One fixed-size all-reduce MAX carries everything the ranks must agree on before the counts move: the list
    # length and signature (as x and -x, so MAX shows any difference), the used code span and whether any rank
    # skips a matrix. Only when some rank skips does a second all-reduce (of n skip codes) follow; its length is
    # safe because n was just agreed.
    signature = _signature(keys, matrices)
    first, last = _used_span(batches)
    any_skip = int(any(skip_codes))
    header = torch.tensor(
        [n, -n, signature, -signature, -first, last, any_skip], dtype=torch.int64, device=device
    )
    dist.all_reduce(header, op=dist.ReduceOp.MAX)
    agreed = header.tolist()
    if agreed[0] != n or -agreed[1] != n:
        return _mismatch(keys, "ranks hold different numbers of matrices")
    if agreed[2] != signature or -agreed[3] != signature:
        return _mismatch(keys, "ranks hold different matrices (names or shapes differ)")
    first, last = -agreed[4], agreed[5]
    if agreed[6]:
        codes = torch.tensor(skip_codes, dtype=torch.int64, device=device)
        dist.all_reduce(codes, op=dist.ReduceOp.MAX)
        skips = codes.tolist()
    else:
        skips = [0] * n

    histogrammed = [not skips[i] and not (exact and replicated[i]) for i in range(n)]
    packed_block, first_row, first_code = _reduce_scatter_counts(
        batches, n, device, rank, world, first, last, count_dtype
    )
    del batches

    mine: dict[int, Any] = {}
    rows = [i for i in range(first_row, min(n, first_row + packed_block.shape[0])) if histogrammed[i]]
    if rows:
        # Straight from the packed span: no full-width rows, one host sync per fitted block (as in fit_many).
        try:
            kinds_of_rows = [histogram_kind(matrices[i].dtype) for i in rows]
            mine_rows = packed_block
            if len(rows) != packed_block.shape[0]:  # some rows of the block were not histogrammed
                index = torch.tensor([i - first_row for i in rows], device=packed_block.device)
                mine_rows = packed_block.index_select(0, index)
            fitted = fit_packed_counts(mine_rows, first_code, kinds_of_rows)
            mine.update(zip(rows, fitted))
        except Exception as error:  # never raise between collectives: the other ranks would wait forever
            log.warning("weibull-monitor: cannot fit the summed counts: %r", error)
            mine.update(
                (i, failed_fit(f"fit of the summed counts failed: {error!r}", "histogram")) for i in rows
            )
    if exact:
        for i in range(n):
            if replicated[i] and owners[i] == rank and not skips[i]:
                mine[i] = fit_weibull(matrices[i].tensor.detach(), method="exact")

    merged = _share_fits(mine, n, world, device)
    return {
        key: failed_fit(shards.SKIP_REASONS.get(skips[i], "skipped"), "histogram") if skips[i] else merged[i]
        for i, key in enumerate(keys)
    }


def _local_counts(
    pieces: Sequence[Sequence[torch.Tensor]],
    wanted: Sequence[bool],
    device: torch.device,
    skip_codes: list[int],
    keys: Sequence[str],
    count_dtype: torch.dtype = torch.int64,
) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """This rank's counts as (row indices, first code, ``count_dtype`` [pieces, width + 2]) batches, one per engine
    call (``count_dtype`` must hold the element count of the largest matrix).

    Each batch is cut to the codes it uses right after counting (columns [first code, first code + width), then the
    zero and non-finite columns), so what is kept until the reduce-scatter is O(used span) per piece, not
    N_COLUMNS. A batch that uses no code has width 0 and first code ``N_BINS``.

    A batch the engine cannot count is retried piece by piece; a matrix whose piece still fails gets the
    ``SKIP_FAILED`` code in ``skip_codes`` (agreed across ranks afterwards), never an exception.
    """
    batches: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    batch: list[torch.Tensor] = []
    rows: list[int] = []
    buffer = CountBuffer(_PIECES_PER_CALL)

    def count(tensors: list[torch.Tensor], at: list[int]) -> None:
        counted = buffer.count(tensors)
        first, packed = pack_used_codes(counted.counts)
        buffer.recycle(counted)
        batches.append((torch.tensor(at, device=device), first, packed.to(device=device, dtype=count_dtype)))

    def flush() -> None:
        if not batch:
            return
        try:
            count(batch, rows)
        except Exception:
            for piece, row in zip(batch, rows):
                try:
                    count([piece], [row])
                except Exception as error:
                    log.warning("weibull-monitor: cannot count %s here: %r", keys[row], error)
                    skip_codes[row] = shards.SKIP_FAILED
        batch.clear()
        rows.clear()

    for i, matrix_pieces in enumerate(pieces):
        if not wanted[i]:
            continue
        for piece in matrix_pieces:
            batch.append(piece)
            rows.append(i)
            if len(batch) >= _PIECES_PER_CALL:
                flush()
    flush()
    return batches


def _reduce_scatter_counts(
    batches: Sequence[tuple[torch.Tensor, int, torch.Tensor]],
    n: int,
    device: torch.device,
    rank: int,
    world: int,
    first: int,
    last: int,
    count_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, int, int]:
    """Sum the counts of n matrices over ranks; rank r gets rows [r*B, (r+1)*B) complete.

    Only the magnitude codes some rank actually saw travel: weights occupy a few thousand of the 32768 codes, so
    the columns are cut to the span [first code, last code] agreed in the header all-reduce (see
    :func:`_used_span`), and the buffer that is reduced is [n, span + 2] (the span, then the zero and non-finite columns), never
    [n, N_COLUMNS]. Returns (this rank's packed block [B, span + 2], its first row, the first code).
    """
    import torch.distributed as dist

    width = max(0, last - first + 1)

    rows_per_rank = max(1, -(-n // world))
    # The dtype comes from the caller, never from this rank's batches: a rank with no batches must still agree.
    packed = torch.zeros((rows_per_rank * world, width + 2), dtype=count_dtype, device=device)
    for (
        rows,
        part_first,
        part,
    ) in batches:  # index_add: several pieces (shard slices) may add to one matrix's row
        part_width = part.shape[1] - 2
        if part_width:
            offset = part_first - first
            packed[:, offset : offset + part_width].index_add_(0, rows, part[:, :part_width])
        packed[:, width:].index_add_(0, rows, part[:, part_width:])
    if device.type == "cpu":
        # gloo's reduce-scatter costs several times an all-to-all of the same buffer (measured: ~3 ms against
        # ~0.6 ms for [128, 3000] int32 at world 2), so on CPU every rank sends block r to rank r and sums the
        # blocks it receives itself. Integer sums, so the result is the same whatever the order.
        received = torch.empty_like(packed)
        try:
            dist.all_to_all_single(received, packed)
            mine = received.view(world, rows_per_rank, width + 2).sum(0, dtype=count_dtype)
            return mine, rank * rows_per_rank, first
        except (RuntimeError, NotImplementedError):  # a CPU backend without all-to-all: reduce-scatter below
            del received
    mine = torch.empty((rows_per_rank, width + 2), dtype=count_dtype, device=device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        scatter(mine, packed, op=dist.ReduceOp.SUM)
    except (RuntimeError, NotImplementedError):  # a backend without reduce-scatter: sum everything instead
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        mine = packed[rank * rows_per_rank : (rank + 1) * rows_per_rank]
    return mine, rank * rows_per_rank, first


def _used_span(batches: Sequence[tuple[torch.Tensor, int, torch.Tensor]]) -> tuple[int, int]:
    """(first, last) magnitude code this rank's batches use; (N_BINS, -1) when none (each batch is already cut to
    its used span, see :func:`_local_counts`)."""
    first, last = N_BINS, -1
    for _, part_first, part in batches:
        part_width = part.shape[1] - 2
        if part_width:
            first, last = min(first, part_first), max(last, part_first + part_width - 1)
    return first, last


# Fit fields that travel as float64 (ints below 2**53 and nan survive exactly, Python floats are float64), in order:
# every float and int field the record declares.
_FIT_FLOATS = FLOAT_FIELDS
_FIT_INTS = INT_FIELDS
_ROW_EMPTY, _ROW_PACKED, _ROW_OBJECT = 0, 1, 2


def _share_fits(mine: Mapping[int, Any], n: int, world: int, device: torch.device) -> dict[int, Any]:
    """Every rank's fits, merged: index -> WeibullFit, identical on every rank.

    The common fit (ok, ``method="histogram"``, no reason) travels as one float64 row in a single tensor
    all-gather, which is far cheaper than pickling objects. A fit that does not fit that mould (failed, exact)
    marks its row ``_ROW_OBJECT``; every rank sees the marks after the all-gather, so all ranks then agree to
    share those fits with one object all-gather as well (never the case in a healthy snapshot).
    """
    import torch.distributed as dist

    width = 1 + len(_FIT_FLOATS) + len(_FIT_INTS)
    rows: list[list[float]] = [[_ROW_EMPTY] + [0.0] * (width - 1) for _ in range(n)]
    odd: dict[int, Any] = {}
    for i, fit in mine.items():
        if fit.ok and fit.method == "histogram" and fit.reason is None:
            rows[i] = [
                _ROW_PACKED,
                *(getattr(fit, f) for f in _FIT_FLOATS),
                *(getattr(fit, f) for f in _FIT_INTS),
            ]
        else:
            rows[i][0] = _ROW_OBJECT
            odd[i] = fit
    table = torch.tensor(rows, dtype=torch.float64, device=device).reshape(n, width)
    parts = [torch.empty_like(table) for _ in range(world)]
    dist.all_gather(parts, table)
    # This rank's own fits are kept as they are (the round trip through float64 is exact, so they equal what the
    # other ranks decode); only the other ranks' rows are decoded.
    merged: dict[int, Any] = {i: fit for i, fit in mine.items() if i not in odd}
    need_objects = bool(odd)
    for part in parts:
        for i, row in enumerate(part.cpu().tolist()):
            if row[0] == _ROW_PACKED and i not in merged:
                merged[i] = WeibullFit(
                    **dict(zip(_FIT_FLOATS, row[1 : 1 + len(_FIT_FLOATS)])),
                    **{f: int(v) for f, v in zip(_FIT_INTS, row[1 + len(_FIT_FLOATS) :])},
                    method="histogram",
                    ok=True,
                    reason=None,
                )
            elif row[0] == _ROW_OBJECT:
                need_objects = True
    if need_objects:  # decided from the gathered table, so the same on every rank
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, odd)
        for part in gathered:
            merged.update(part or {})
    return merged


def _mismatch(keys: Sequence[str], why: str) -> dict[str, WeibullFit]:
    reason = f"distributed snapshot skipped: {why} (every rank must monitor the same model)"
    log.warning("weibull-monitor: %s", reason)
    fit = failed_fit(reason, "histogram")
    return dict.fromkeys(keys, fit)
