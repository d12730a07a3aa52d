"""``weibull-monitor scan``: fit every weight matrix of saved checkpoints, through the same snapshot builder as the
training monitor (so a scan and a run report the same class medians on the same weights).

:func:`scan_checkpoint` turns one :class:`~weibull_monitor.offline.checkpoints.Checkpoint` into rows (one per matrix,
plus one per split part of a fused matrix) and a :class:`~weibull_monitor.snapshot.Snapshot`; :func:`write_store`
records the snapshots in a run store so ``report`` can draw them. Rendering lives in ``offline.tables``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weibull_monitor.distributed import LocalMatrix, Matrix
from weibull_monitor.estimator import WeibullFit, fit_many, fit_weibull, in_histogram_range
from weibull_monitor.estimator.histogram import WeightHistogram
from weibull_monitor.estimator.protocol import readable_tensor
from weibull_monitor.estimator.record import FLOAT_FIELDS, INT_FIELDS
from weibull_monitor.models import Role, attention_kind, classify
from weibull_monitor.models.expectations import selection_expectation
from weibull_monitor.offline.checkpoints import Checkpoint, open_checkpoints
from weibull_monitor.offline.memory import no_cyclic_gc, release
from weibull_monitor.offline.progress import Progress
from weibull_monitor.offline.sources import TensorInfo
from weibull_monitor.plain_data import finite_or_none
from weibull_monitor.snapshot import MatrixEntry, Snapshot, SnapshotBuilder, entries_for
from weibull_monitor.store import RunStore

__all__ = [
    "JSON_FIELDS",
    "ScanResult",
    "fit_matrix",
    "matrix_roles",
    "scan_checkpoint",
    "scan_path",
    "write_store",
]

#: Keys of every row, in the order ``--csv`` writes them (``--json`` writes the same keys).
JSON_FIELDS = (
    "name",
    "layer",
    "component",
    "klass",
    "k",
    "k_stderr",
    "scale",
    "scale_rel_stderr",
    "r2",
    "n",
    "n_zero",
    "n_nonfinite",
    "step",
    "method",
    "ok",
    "reason",
    "expert",
    "stack",
    "fused_parent",
    "q10",
    "q50",
    "q90",
    "q99",
    "q999",
    "shape",
    "dtype",
    "path",
)


@dataclass
class ScanResult:
    """The fits of one checkpoint: rows for output, its snapshot (fits, roles, dynamics, class aggregates) for the
    tables and the store, and what was skipped and why."""

    path: str
    step: int | None
    format: str
    attention_kind: str | None
    snapshot: Snapshot
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_matrices: int = 0

    @property
    def fits(self) -> dict[str, WeibullFit]:
        return self.snapshot.fits

    @property
    def roles(self) -> dict[str, Role]:
        return self.snapshot.roles


def _row(key: str, info: TensorInfo, role: Any, fit: Any, step: int | None, path: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(JSON_FIELDS)  # in JSON_FIELDS order (what --csv writes), all None
    row["name"] = key
    row["layer"] = role.layer
    row["component"] = role.component
    row["klass"] = role.klass
    row["step"] = step
    row["expert"] = role.expert
    row["stack"] = role.stack
    row["fused_parent"] = role.fused_parent
    row["shape"] = list(info.shape)
    row["dtype"] = info.dtype
    row["path"] = path
    row["ok"] = False
    if fit is not None:
        row["method"] = fit.method
        row["ok"] = bool(fit.ok)
        row["reason"] = fit.reason
        for name in INT_FIELDS:
            row[name] = int(getattr(fit, name))
        if fit.ok:  # a fit that is not ok has nan (None here) in every float field
            for name in FLOAT_FIELDS:
                row[name] = finite_or_none(getattr(fit, name))
    return row


def _skip_row(
    key: str, info: TensorInfo, role: Any, reason: str, step: int | None, path: str
) -> dict[str, Any]:
    row = _row(key, info, role, None, step, path)
    row["reason"] = reason
    return row


#: Matrices above this many elements are histogrammed in row blocks whose mapped pages are released one block at
#: a time, so a scan holds one block of a large matrix in memory, not the matrix (64 MB of fp32 per block).
CHUNK_ELEMENTS = 1 << 24
#: Smaller matrices are fitted together through ``fit_many``, up to this many per call (or CHUNK_ELEMENTS elements):
#: one fit per matrix cost 8 ms at 64 x 64 (the histogram's full-width count rows), one batched fit 0.2 ms.
BATCH_MATRICES = 4096


def fit_matrix(tensor: Any, method: str) -> Any:
    """``fit_weibull(tensor, method=method)``, reading a large memory-mapped matrix block by block.

    Histogram counts of row blocks add up to the histogram of the whole matrix, so the result is the same fit; the
    pages of each block go back to the kernel once it is counted (for tensors a loader mapped from a file).
    """
    numel = tensor.numel()
    if method != "histogram" or numel <= CHUNK_ELEMENTS or tensor.dim() < 2 or not tensor.is_contiguous():
        return fit_weibull(tensor, method=method)
    readable, _ = readable_tensor(tensor)
    if readable is None:
        return fit_weibull(tensor, method=method)  # the fit engine words the reason
    try:
        rows = tensor.shape[0]
        block = max(1, CHUNK_ELEMENTS // max(1, numel // rows))
        total = None
        for start in range(0, rows, block):
            part = tensor[start : start + block]
            counts = WeightHistogram.from_tensor(part)
            total = counts if total is None else total.merge(counts)
            release(part)
        return in_histogram_range(tensor, total.fit())
    except Exception:  # any surprise in the block path: the plain fit decides (and never raises)
        return fit_weibull(tensor, method=method)


def _classify(info: TensorInfo, config: Any) -> Any:
    """The role of a stored tensor; a config whose values make no sense (zero heads, strings for counts) must not
    stop the scan, so the name and shape alone decide then."""
    try:
        return classify(info.role_name, info.shape or None, config)
    except Exception:
        return classify(info.role_name, info.shape or None, None)


def matrix_roles(checkpoint: Checkpoint, infos: Sequence[TensorInfo] | None = None) -> dict[str, Any]:
    """Roles of the tensors of ``checkpoint`` that are weight matrices (keyed by the name in the file).

    Norms, biases and integer buffers (position ids) are left out; a tensor named by an index whose shard is missing
    (shape unknown) is kept as "other" so that it shows up as skipped.
    """
    roles: dict[str, Any] = {}
    for info in checkpoint.infos() if infos is None else infos:
        role = _classify(info, checkpoint.config)
        if role is None and info.skip_reason is not None and not info.shape:
            role = Role(layer=None, component="other", klass="other")
        if role is not None and not info.is_float and info.skip_reason is None and role.component == "other":
            role = None  # an integer buffer (position ids, masks), not a weight
        if role is not None:
            roles[info.name] = role
    return roles


def _entries(
    info: TensorInfo, tensor: torch.Tensor, role: Any, config: Any, failures: dict[str, str]
) -> list:
    """The matrix entries of one stored tensor (itself and its split parts); a role map that fails on this config
    fits the tensor whole and says why."""
    try:
        return entries_for(info.role_name, LocalMatrix(tensor), role, config, skipped=failures)
    except Exception as error:
        failures[info.role_name] = f"split failed: {type(error).__name__}: {error}"
        return (
            [] if role.stacked else [MatrixEntry(info.role_name, info.role_name, LocalMatrix(tensor), role)]
        )


class _ShapeOnly(Matrix):
    """What the snapshot builder needs of a fitted matrix: its shape (no data, no file pages, no tensor)."""

    def __init__(self, shape: torch.Size, dtype_name: str) -> None:
        self._shape = shape
        self._dtype_name = dtype_name

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self._dtype_name)


class _Batch:
    """Matrices waiting to be fitted together: ``fit_many`` over up to BATCH_MATRICES of them."""

    def __init__(self, method: str, fits: dict[str, WeibullFit]) -> None:
        self.method = method
        self.fits = fits
        self.keys: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self.elements = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if tensor.numel() > CHUNK_ELEMENTS:
            self.fits[key] = fit_matrix(tensor, self.method)  # block by block, its pages released as it goes
            return
        self.keys.append(key)
        self.tensors.append(tensor)
        self.elements += tensor.numel()
        if len(self.keys) >= BATCH_MATRICES or self.elements >= CHUNK_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if self.keys:
            self.fits.update(fit_many(list(zip(self.keys, self.tensors)), method=self.method))
        self.keys, self.tensors, self.elements = [], [], 0


def scan_checkpoint(
    checkpoint: Checkpoint,
    *,
    method: str = "histogram",
    on_tensor: Callable[[str], None] | None = None,
    builder: SnapshotBuilder | None = None,
    roles: dict[str, Any] | None = None,
) -> ScanResult:
    """Fit every weight matrix of ``checkpoint`` (and each part of a fused one).

    Small matrices are fitted in batches through ``fit_many`` (their tensors are views of the file map: a batch
    holds no copy), large ones one at a time, block by block. ``on_tensor(name)`` is called after each tensor (a
    progress hook). ``builder`` carries a series' history (scale growth is measured from the first checkpoint); a
    fresh one by default. Tensors that are no matrix (norms, biases) are counted in ``not_matrices``; matrices that
    cannot be read (meta, offloaded, non-float, broadcast views) become rows with ``ok=False`` and a reason, and are
    listed in ``skipped``.
    """
    config = checkpoint.config
    infos = checkpoint.infos()
    roles = matrix_roles(checkpoint, infos) if roles is None else roles
    # attention_kind looks for a fused QKV among the names (the role map has matched every one already: only the
    # qkv ones, or any one to say there are names, need to be matched again, not 100,000 of them)
    names = [i.role_name for i in infos if i.name in roles]
    fused = [i.role_name for i in infos if i.name in roles and roles[i.name].component == "qkv"]
    try:
        kind = attention_kind(config, fused or names[:1])
    except Exception:  # a config that says nothing usable about attention
        kind = None
    path = str(checkpoint.path)
    planned: list[tuple[str, Any]] = []  # in file order: ("row", row) or ("fit", (key, info, role))
    skipped: dict[str, str] = {}
    entries: list[MatrixEntry] = []
    fits: dict[str, WeibullFit] = {}
    batch = _Batch(method, fits)
    for info, tensor in checkpoint.tensors(list(roles)):
        role = roles[info.name]
        reason = _unreadable(info, tensor)
        if reason is not None:
            planned.append(("row", _skip_row(info.name, info, role, reason, checkpoint.step, path)))
            skipped[info.name] = reason
        else:
            split_failures: dict[str, str] = {}
            plain = not role.parts and not role.stacked  # the common case, kept lean: one matrix, no parts
            if plain:
                batch.add(info.name, tensor)
                entries.append(MatrixEntry(info.name, info.name, _ShapeOnly(tensor.shape, info.dtype), role))
                planned.append(("fit", (info.name, info, role)))
            # the role map sees the name the format translates to (GGUF); the store keeps the name in the file
            for entry in [] if plain else _entries(info, tensor, role, config, split_failures):
                key = entry.key.replace(info.role_name, info.name, 1)
                batch.add(key, entry.matrix.tensor)
                # a stand-in: the snapshot needs the shape, and must not keep the file's pages mapped
                shape = tuple(entry.matrix.shape)
                stand_in = _ShapeOnly(torch.Size(shape), info.dtype)
                entries.append(MatrixEntry(key, info.name, stand_in, entry.role, entry.component))
                part_info = info if entry.component is None else TensorInfo(key, shape, info.dtype, key)
                planned.append(("fit", (key, part_info, entry.role)))
            for why in split_failures.values():
                reason = why.replace("split failed", "not split", 1)
                skipped[info.name] = reason
                if role.stacked:
                    planned.append(("row", _skip_row(info.name, info, role, reason, checkpoint.step, path)))
        del tensor
        if on_tensor:
            on_tensor(info.name)
    batch.flush()
    rows = [
        item if what == "row" else _row(item[0], item[1], item[2], fits[item[0]], checkpoint.step, path)
        for what, item in planned
    ]
    builder = builder if builder is not None else SnapshotBuilder()
    snapshot = builder.build(
        checkpoint.step if checkpoint.step is not None else 0,
        entries,
        fits,
        skipped=skipped,
        attention_kind=kind,
        expectation=selection_expectation(kind),
    )
    result = ScanResult(path, checkpoint.step, checkpoint.format, kind, snapshot, rows, list(skipped.items()))
    result.not_matrices = sum(1 for i in infos if i.name not in roles)
    return result


def _unreadable(info: TensorInfo, tensor: torch.Tensor | None) -> str | None:
    """Why a stored tensor cannot be fitted, or None."""
    if info.skip_reason is not None:
        return info.skip_reason
    if tensor is None:
        return "no data"
    if not info.is_float:
        return f"dtype {info.dtype} is not a floating-point weight"
    if tensor.is_meta:
        return "meta tensor (no data stored)"
    return None


def scan_path(
    path: str | Path,
    *,
    method: str = "histogram",
    follow_symlinks: bool = False,
    progress: bool | None = None,
) -> list[ScanResult]:
    """Scan PATH (a file, a model directory or a series of checkpoints): one :class:`ScanResult` per checkpoint.

    ``progress``: draw a bar on stderr (None: only when stderr is a terminal).
    """
    with no_cyclic_gc():  # thousands of small records, no cycles: the collector only costs time here
        checkpoints = open_checkpoints(path, follow_symlinks=follow_symlinks)
        roles = [matrix_roles(c) for c in checkpoints]
        bar = Progress(sum(len(r) for r in roles), enabled=progress)
        builder = SnapshotBuilder()  # one history for the series: growth from the first checkpoint
        try:
            return [
                scan_checkpoint(c, method=method, on_tensor=bar.advance, builder=builder, roles=r)
                for c, r in zip(checkpoints, roles)
            ]
        finally:
            bar.close()


def write_store(
    results: list[ScanResult], store_path: str | Path, source: str | Path, run_name: str | None = None
) -> int:
    """Record ``results`` in a RunStore: one run per scanned ``source`` path, one snapshot per step.

    A single checkpoint is stored as step 0. Returns the run id. A step already stored for that run is left as it
    was (the store refuses duplicates), so scanning the same path twice does not double it.
    """
    if not results:
        raise ValueError("nothing to store")
    name = run_name or f"scan:{Path(source).resolve()}"
    with RunStore(store_path) as store:
        meta = {
            "source": "scan",
            "path": str(source),
            "format": results[0].format,
            "attention_kind": results[-1].attention_kind,
            "series": len(results) > 1 or results[0].step is not None,
        }
        run_id = store.open_run(name, meta)
        for result in results:
            store.write_snapshot(run_id, result.snapshot)
        return run_id
