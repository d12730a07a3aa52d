"""Shard-aware snapshots under torch.distributed: DDP, FSDP2 / tensor parallel (DTensor), DeepSpeed ZeRO-3.

Histogram counts add across pieces of a matrix (``science.md`` §6), so no weight ever has to leave its rank:

- replicated matrices (DDP, or any plain tensor while a process group is up) are dealt out to ranks by element
  count, each rank histograms only its own ~1/world of the elements;
- sharded matrices (DTensor, ZeRO-3 partitions) are histogrammed where they lie, each rank its local shard;
- split views of a sharded fused parameter (QKV) are histogrammed from the slices of the local shard that fall in
  the component (see :func:`split_views`), never by slicing the sharded parameter (which would gather it);

and one reduce-scatter SUM of a single ``[M, span]`` int32 tensor (int64 if some matrix has 2**31 elements or more), where each rank filled only what it holds,
completes every matrix at once: rank r receives the complete counts of one block of M/world matrices and fits
them; one all-gather of a small float64 table of fit fields shares the fits, so every matrix is fitted once and
every rank holds the same fits. Collectives per snapshot: one tiny fixed-size all-reduce (entry-list check, used
code span, whether any rank skips; a second one with the skip codes only when some rank skips), the reduce-scatter
of the counts and the all-gather of the fits (plus an object all-gather only for failed or exact fits).

Extra memory per rank: this rank's count rows cut to the codes they use (8 bytes x (used span + 2) per piece), the
``[M, span + 2]`` buffer that is reduced and the ``[M/world, span + 2]`` block it receives, plus slice-sized
temporaries (one engine call of ``_PIECES_PER_CALL`` pieces, one fit of ``histogram.SLICE_ROWS`` full-width rows);
never a matrix, and never 256 KB per matrix.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from weibull_monitor import _shards
from weibull_monitor._shards import Skip, global_shape, is_sharded

__all__ = [
    "agree",
    "compute_fits",
    "global_shape",
    "is_active",
    "is_sharded",
    "register_fsdp1",
    "split_views",
]

log = logging.getLogger(__name__)

# Pieces histogrammed per call: bounds the engine's [pieces, N_COLUMNS] temporary while keeping small matrices batched.
_PIECES_PER_CALL = 32

_PARENT_ATTR = "_weibull_parent"
_LAYOUT_OK_ATTR = "_weibull_layout_ok"


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


def split_views(name: str, param: torch.Tensor, config: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """``roles.split_fused`` that never gathers: use it in place of ``roles.split_fused`` when collecting entries.

    For a plain tensor this is ``roles.split_fused(name, param, config, as_matrix=False)`` (strided views). For a
    sharded parameter (DTensor, ZeRO-3, registered FSDP1) slicing would gather the full matrix, so the split is
    applied to a ``meta`` tensor of the global shape instead: the returned views hold no data, only which elements
    each component takes, and :func:`compute_fits` reads those elements from the local shard of ``param``.
    """
    from weibull_monitor import roles

    # Strided views, never copies (a fit needs the elements, not their arrangement; and a copy of the meta proxy
    # below would no longer say which elements it holds).
    kwargs = {**kwargs, "as_matrix": False}
    if not is_sharded(param):
        return roles.split_fused(name, param, config, **kwargs)
    proxy = torch.empty(global_shape(param), dtype=param.dtype, device="meta")
    views = roles.split_fused(name, proxy, config, **kwargs)
    for view in views.values():
        setattr(view, _PARENT_ATTR, param)
        # A copy (not a view of the proxy) has lost the geometry that says which elements it holds.
        setattr(view, _LAYOUT_OK_ATTR, view._base is proxy or view is proxy)
    return views


def register_fsdp1(model: torch.nn.Module) -> int:
    """Record, on each original parameter of an FSDP1 model (``use_orig_params=True``), which flat slice of its
    matrix this rank holds, so that it is read as a shard. Returns how many parameters were registered.

    FSDP1 replaces every original parameter's data by a 1-D view of this rank's slice; nothing on the parameter
    itself says which slice, so this reads FSDP's own bookkeeping (the flat parameter's shard infos) once. Call
    it after wrapping, on every rank. The parameters keep their identity across steps, so once is enough.
    """
    count = 0
    for module in model.modules():
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        params = getattr(flat, "_params", None)
        if flat is None or params is None:  # not FSDP1, or use_orig_params=False (no original parameters)
            continue
        sharded = bool(getattr(handle, "uses_sharded_strategy", True))
        for param, shape, info in zip(params, flat._shapes, flat._shard_param_infos):
            if info.in_shard:
                start, stop = int(info.intra_param_start_idx), int(info.intra_param_end_idx) + 1
            else:
                start = stop = 0
            setattr(param, _shards.FSDP1_ATTR, (torch.Size(shape), start, stop, sharded))
            count += 1
    return count


# --- planning -----------------------------------------------------------------------------------------------------


def _entry_tensor(entry: Any) -> torch.Tensor:
    return entry.tensor


def _kind(tensor: torch.Tensor) -> str:
    if getattr(tensor, _PARENT_ATTR, None) is not None:
        return "split"
    if is_sharded(tensor):
        return "sharded"
    if tensor.device.type == "meta":
        return "unreadable"
    return "replicated"


def _owners(sizes: Sequence[int], world: int) -> list[int]:
    """Deal matrices to ranks, largest first, each to the least-loaded rank (deterministic: same on every rank)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += sizes[index]
    return owner


def _signature(entries: Sequence[Any]) -> int:
    """A CRC of keys and global shapes: every rank must hold the same entry list for the collectives to line up."""
    text = ";".join(f"{e.key}|{tuple(global_shape(_entry_tensor(e)))}" for e in entries)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _skipped_fit(reason: str) -> Any:
    from weibull_monitor.fit import failed_fit

    return failed_fit(reason, "histogram")


def _dtype(tensor: torch.Tensor) -> torch.dtype:
    part = getattr(
        tensor, "ds_tensor", None
    )  # a ZeRO-3 parameter's own dtype may differ from its partition's
    return part.dtype if part is not None else tensor.dtype


def _local_pieces(tensor: torch.Tensor, kind: str, owner: int, rank: int) -> list[torch.Tensor]:
    dtype = _dtype(tensor)
    if not dtype.is_floating_point or dtype.is_complex:
        raise Skip(_shards.SKIP_DTYPE)
    if kind == "replicated":
        data = tensor.detach()
        return [data] if owner == rank and data.numel() else []
    if kind == "sharded":
        return _shards.local_share(tensor)
    if kind == "split":
        if not getattr(tensor, _LAYOUT_OK_ATTR, False):
            raise Skip(_shards.SKIP_LAYOUT)
        return _shards.split_share(tensor, getattr(tensor, _PARENT_ATTR))
    raise Skip(_shards.SKIP_UNREADABLE)


# --- the collective ------------------------------------------------------------------------------------------------


def compute_fits(entries: Sequence[Any], method: str = "histogram") -> Mapping[str, Any]:
    """Fit every entry's matrix across all ranks; collective, the result is identical on every rank.

    ``entries`` are ``snapshot.MatrixEntry`` (``key``, ``tensor``) and must be the same list, in the same order, on
    every rank. Each matrix is counted where its elements lie, the counts are summed with one reduce-scatter (so
    rank r receives the complete counts of one block of matrices), each rank fits its block, and one all-gather
    of a float64 table of fit fields shares the fits: every matrix is fitted once, and every rank returns the same fits.

    ``method="exact"`` fits replicated matrices by a full sort on their owner rank; sharded matrices are always
    fitted from their summed histograms (no rank holds them whole) and say ``method="histogram"``. Matrices that
    cannot be read without gathering get a not-ok fit with the reason, on every rank.
    """
    import torch.distributed as dist

    if method not in ("histogram", "exact"):  # same on every rank, so raising here cannot split the ranks
        raise ValueError(f"method must be 'histogram' or 'exact', got {method!r}")
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = [_entry_tensor(e) for e in entries]
    kinds = [_kind(t) for t in tensors]
    sizes = [
        int(torch.Size(global_shape(t)).numel()) if k == "replicated" else 0 for t, k in zip(tensors, kinds)
    ]
    owners = _owners(sizes, world)
    n = len(entries)

    pieces: list[list[torch.Tensor]] = []
    skip_codes = [0] * n
    for i, (tensor, kind) in enumerate(zip(tensors, kinds)):
        try:
            pieces.append(_local_pieces(tensor, kind, owners[i], rank))
        except Skip as skip:
            skip_codes[i] = skip.code
            pieces.append([])
        except Exception as error:
            # A layout this module does not know: recorded, never fatal, never gathered.
            log.warning("weibull-monitor: cannot read the local share of %s: %r", entries[i].key, error)
            skip_codes[i] = _shards.SKIP_FAILED
            pieces.append([])

    # All local work that could fail happens before the first collective: a failure becomes a skip code that the
    # header below makes every rank agree on, so no rank is left waiting in a collective the others never reach.
    exact = method == "exact"
    device = _collective_device()
    wanted = [not skip_codes[i] and not (exact and kinds[i] == "replicated") for i in range(n)]
    # A count never exceeds its matrix's element count, so int32 is exact below 2**31 elements per matrix and halves
    # what is kept and what the reduce-scatter moves. Decided from global shapes: the same on every rank.
    largest = max((int(torch.Size(global_shape(t)).numel()) for t in tensors), default=0)
    count_dtype = torch.int32 if largest < 2**31 else torch.int64
    batches = _local_counts(pieces, wanted, device, skip_codes, entries, count_dtype)

    # One fixed-size all-reduce MAX carries everything the ranks must agree on before the counts move: the list
    # length and signature (as x and -x, so MAX shows any difference), the used code span and whether any rank
    # skips a matrix. Only when some rank skips does a second all-reduce (of n skip codes) follow; its length is
    # safe because n was just agreed.
    signature = _signature(entries)
    first, last = _used_span(batches)
    any_skip = int(any(skip_codes))
    header = torch.tensor(
        [n, -n, signature, -signature, -first, last, any_skip], dtype=torch.int64, device=device
    )
    dist.all_reduce(header, op=dist.ReduceOp.MAX)
    agreed = header.tolist()
    if agreed[0] != n or -agreed[1] != n:
        return _mismatch(entries, "ranks hold different numbers of matrices")
    if agreed[2] != signature or -agreed[3] != signature:
        return _mismatch(entries, "ranks hold different matrices (names or shapes differ)")
    first, last = -agreed[4], agreed[5]
    if agreed[6]:
        codes = torch.tensor(skip_codes, dtype=torch.int64, device=device)
        dist.all_reduce(codes, op=dist.ReduceOp.MAX)
        skips = codes.tolist()
    else:
        skips = [0] * n

    histogrammed = [not skips[i] and not (exact and kinds[i] == "replicated") for i in range(n)]
    packed_block, first_row, first_code = _reduce_scatter_counts(
        batches, n, device, rank, world, first, last, count_dtype
    )
    del batches

    mine: dict[int, Any] = {}
    rows = [i for i in range(first_row, min(n, first_row + packed_block.shape[0])) if histogrammed[i]]
    if rows:
        from weibull_monitor import histogram

        # Straight from the packed span: no full-width rows, blocks of up to histogram.FIT_BLOCK_ROWS rows, one
        # host sync per block (as in fit.fit_many).
        try:
            kinds_of_rows = [histogram.histogram_kind(_dtype(tensors[i])) for i in rows]
            mine_rows = packed_block
            if len(rows) != packed_block.shape[0]:  # some rows of the block were not histogrammed
                index = torch.tensor([i - first_row for i in rows], device=packed_block.device)
                mine_rows = packed_block.index_select(0, index)
            fitted = histogram.fit_packed_counts(mine_rows, first_code, kinds_of_rows)
            mine.update(zip(rows, fitted))
        except Exception as error:  # never raise between collectives: the other ranks would wait forever
            log.warning("weibull-monitor: cannot fit the summed counts: %r", error)
            mine.update((i, _skipped_fit(f"fit of the summed counts failed: {error!r}")) for i in rows)
    if exact:
        from weibull_monitor.fit import fit_weibull

        for i in range(n):
            if kinds[i] == "replicated" and owners[i] == rank and not skips[i]:
                mine[i] = fit_weibull(tensors[i].detach(), method="exact")

    merged = _share_fits(mine, n, world, device)
    fits: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        if skips[i]:
            fits[entry.key] = _skipped_fit(_shards.SKIP_REASONS.get(skips[i], "skipped"))
        else:
            fits[entry.key] = merged[i]
    return fits


def _local_counts(
    pieces: Sequence[Sequence[torch.Tensor]],
    wanted: Sequence[bool],
    device: torch.device,
    skip_codes: list[int],
    entries: Sequence[Any],
    count_dtype: torch.dtype = torch.int64,
) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """This rank's counts as (row indices, first code, ``count_dtype`` [pieces, width + 2]) batches, one per engine
    call (``count_dtype`` must hold the element count of the largest matrix).

    Each batch is cut to the codes it uses right after counting (columns [first code, first code + width), then the
    zero and non-finite columns), so what is kept until the reduce-scatter is O(used span) per piece, not
    N_COLUMNS. A batch that uses no code has width 0 and first code ``histogram.N_BINS``.

    A batch the engine cannot count is retried piece by piece; a matrix whose piece still fails gets the
    ``SKIP_FAILED`` code in ``skip_codes`` (agreed across ranks afterwards), never an exception.
    """
    from weibull_monitor import histogram

    batches: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    batch: list[torch.Tensor] = []
    rows: list[int] = []

    # One [32, N_COLUMNS] count buffer for every engine call, zeroed by span after each (as fit.fit_many does):
    # 8 MB allocated and freed per call fragmented the heap, and later collectives then raised the RSS by 100-250
    # MB instead of ~50 (2,000 small matrices, measured).
    buffer: list[torch.Tensor] = []

    def count(tensors: list[torch.Tensor], at: list[int]) -> None:
        out = buffer[0][: len(tensors)] if buffer else None
        try:
            full, _, _, span = histogram._count_batch(tensors, out)
            first, packed = _cut_to_used_codes(full)
        except Exception:
            buffer.clear()  # it may hold part of the failed count: the retries start from a fresh one
            raise
        if len(tensors) == _PIECES_PER_CALL and full.device.type == "cpu":
            histogram._zero_span(full, span)
            buffer[:] = [full]
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
                    log.warning("weibull-monitor: cannot count %s here: %r", entries[row].key, error)
                    skip_codes[row] = _shards.SKIP_FAILED
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


def _cut_to_used_codes(counts: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Count rows [P, N_COLUMNS] -> (first used code, packed [P, width + 2]): the used code span, then the zero and
    non-finite columns. A fresh tensor (the full-width rows can be freed); width 0 and first ``N_BINS`` when no
    code is used."""
    from weibull_monitor import histogram

    n_bins = histogram.N_BINS
    # Counts are never negative, so "max > 0" is "any": amax is the cheaper reduction.
    used = torch.nonzero(counts[:, :n_bins].amax(0)).reshape(-1)
    if not used.numel():
        return n_bins, counts[:, n_bins:].clone()
    first, last = int(used[0]), int(used[-1])
    return first, torch.cat((counts[:, first : last + 1], counts[:, n_bins:]), dim=1)


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
    from weibull_monitor import histogram

    first, last = histogram.N_BINS, -1
    for _, part_first, part in batches:
        part_width = part.shape[1] - 2
        if part_width:
            first, last = min(first, part_first), max(last, part_first + part_width - 1)
    return first, last


# Fit fields that travel as float64 (ints below 2**53 and nan survive exactly, Python floats are float64), in order.
_FIT_FLOATS = ("k", "scale", "r2", "k_stderr", "scale_rel_stderr", "q10", "q50", "q90", "q99", "q999")
_FIT_INTS = ("n", "n_zero", "n_nonfinite")
_ROW_EMPTY, _ROW_PACKED, _ROW_OBJECT = 0, 1, 2


def _share_fits(mine: Mapping[int, Any], n: int, world: int, device: torch.device) -> dict[int, Any]:
    """Every rank's fits, merged: index -> WeibullFit, identical on every rank.

    The common fit (ok, ``method="histogram"``, no reason) travels as one float64 row in a single tensor
    all-gather, which is far cheaper than pickling objects. A fit that does not fit that mould (failed, exact)
    marks its row ``_ROW_OBJECT``; every rank sees the marks after the all-gather, so all ranks then agree to
    share those fits with one object all-gather as well (never the case in a healthy snapshot).
    """
    import torch.distributed as dist

    from weibull_monitor.fit import WeibullFit

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


def _mismatch(entries: Sequence[Any], why: str) -> dict[str, Any]:
    reason = f"distributed snapshot skipped: {why} (every rank must monitor the same model)"
    log.warning("weibull-monitor: %s", reason)
    fit = _skipped_fit(reason)
    return {e.key: fit for e in entries}
