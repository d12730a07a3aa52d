"""Magnitude codes: the 15-bit integer read from a weight's bit pattern without its sign, monotone in |w|.

Three kinds of histogram, fixed by the source dtype (docs/estimator.md §2):

- ``"bf16"`` (bf16 and float8 weights, float8 cast chunkwise to bf16, which is exact): the bf16 pattern;
- ``"fp16"``: the fp16 pattern itself (fp16 also has 15 magnitude bits);
- ``"fp32"`` (fp32, and fp64 cast chunkwise to fp32): the high 16 bits of the fp32 pattern, read through an integer
  view without any float conversion pass (truncation: code c holds the values in [v(c), v(c+1))).

In the bf16 and fp16 kinds every element *equals* its code's value, so the counts are the sorted sample and the fit
reproduces the sort-based protocol; in the fp32 kind values inside a bin are interpolated (uniform in ln|w|).

Columns of a count row: 0..N_BINS-1 the magnitude codes (code 0 and the Inf/NaN codes always hold 0), then
ZERO_COLUMN (|w| == 0; for the fp32 kind also |w| < 2**-133, fp32 subnormals whose high 16 bits are zero) and
NONFINITE_COLUMN.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

__all__ = [
    "ALL_CODES",
    "EXACT_KINDS",
    "KINDS",
    "NONFINITE_COLUMN",
    "NO_CODES",
    "N_BINS",
    "N_COLUMNS",
    "ZERO_COLUMN",
    "Span",
    "code_values",
    "finalise",
    "histogram_kind",
    "move_special_columns",
    "pack_used_codes",
    "tables",
    "union",
    "zero_span",
]

N_BINS: int = 1 << 15
ZERO_COLUMN: int = N_BINS
NONFINITE_COLUMN: int = N_BINS + 1
N_COLUMNS: int = N_BINS + 2
KINDS = ("bf16", "fp16", "fp32")
EXACT_KINDS = ("bf16", "fp16")  # every element equals its code's value
FIRST_NONFINITE_CODE = {"bf16": 0x7F80, "fp16": 0x7C00, "fp32": 0x7F80}  # exponent all ones: Inf and NaN


def histogram_kind(dtype: torch.dtype) -> str:
    """The histogram kind of a floating dtype: "bf16" (bf16, float8), "fp16", or "fp32" (fp32, fp64, others)."""
    if dtype == torch.bfloat16 or "float8" in str(dtype):
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "fp32"


HIGH_HALF = 1 if sys.byteorder == "little" else 0  # index of the high int16 inside an fp32 pattern

Span = tuple[int, int]
"""(first, last) raw code column >= 1 a count may have touched (column 0 holds the zeros until they move to
ZERO_COLUMN); NO_CODES when none, ALL_CODES when not known."""
NO_CODES: Span = (N_BINS, -1)
ALL_CODES: Span = (0, N_BINS - 1)


def union(a: Span, b: Span) -> Span:
    return (min(a[0], b[0]), max(a[1], b[1]))


def finalise(raw: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """Raw code counts [M, N_BINS] -> count rows [M, N_COLUMNS]: zeros and Inf/NaN moved to their own columns."""
    counts = torch.zeros(raw.shape[0], N_COLUMNS, dtype=torch.int64, device=raw.device)
    counts[:, :N_BINS] = raw
    move_special_columns(counts, kinds)
    return counts


def move_special_columns(counts: torch.Tensor, kinds: Sequence[str]) -> None:
    """In place on [M, N_COLUMNS] rows whose code columns hold raw counts: code 0 -> ZERO_COLUMN, Inf/NaN codes ->
    NONFINITE_COLUMN."""
    counts[:, ZERO_COLUMN] = counts[:, 0]
    counts[:, 0] = 0
    for kind in set(kinds):
        first = FIRST_NONFINITE_CODE[kind]
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if len(rows) == len(kinds):
            counts[:, NONFINITE_COLUMN] = counts[:, first:N_BINS].sum(1)
            counts[:, first:N_BINS] = 0
        else:
            index = torch.tensor(rows, device=counts.device)
            counts[index, NONFINITE_COLUMN] = counts[index, first:N_BINS].sum(1)
            counts[index, first:N_BINS] = 0


_TABLES: dict[str, torch.Tensor] = {}


def code_values(kind: str) -> torch.Tensor:
    """float64 value of every code 0..N_BINS of a kind (codes from Inf upwards: a placeholder past the largest)."""
    codes = torch.arange(N_BINS + 1, dtype=torch.int32)
    if kind == "fp16":
        values = codes[:N_BINS].to(torch.int16).view(torch.float16).to(torch.float64)
        values = torch.cat([values, values[-1:]])
        placeholder = 2.0**16
    else:
        values = (codes << 16).view(torch.float32).to(torch.float64)
        placeholder = 2.0**128
    values[FIRST_NONFINITE_CODE[kind] :] = placeholder
    return values


def tables(device: torch.device) -> torch.Tensor:
    """[3, len(KINDS), N_BINS] float64: ln of (code value, bin low edge, bin high edge) for every kind.

    Exact kinds (bf16, fp16) come from round-to-nearest, so a code's bin reaches halfway to each neighbour; the fp32
    kind truncates, so code c's bin is [v(c), v(c+1)).
    """
    key = str(device)
    table = _TABLES.get(key)
    if table is None:
        per_kind = []
        for kind in KINDS:
            v = code_values(kind)
            value = v[:N_BINS]
            nxt = v[1 : N_BINS + 1]
            prev = torch.cat([torch.zeros(1, dtype=torch.float64), v[: N_BINS - 1]])
            if kind in EXACT_KINDS:
                lo, hi = (prev + value) / 2, (value + nxt) / 2
            else:
                lo, hi = value, nxt
            per_kind.append(torch.stack([torch.log(value), torch.log(lo), torch.log(hi)]))
        table = torch.stack(per_kind, dim=1)
        table[~torch.isfinite(table)] = 0.0  # code 0 (ln 0) is never looked up: its count is always 0
        table = table.to(device)
        _TABLES[key] = table
    return table


def zero_span(counts: torch.Tensor, span: Span) -> None:
    """Zero every column of ``counts`` that a count with this ``span`` may have written."""
    if span == NO_CODES:
        counts[:, N_BINS:] = 0
    elif span == ALL_CODES:
        counts.zero_()
    else:
        counts[:, span[0] : span[1] + 1] = 0
        counts[:, 0] = 0
        counts[:, N_BINS:] = 0


def pack_used_codes(counts: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Count rows [P, N_COLUMNS] -> (first used code, packed [P, width + 2]): the span of codes some row uses,
    then ZERO_COLUMN and NONFINITE_COLUMN. A fresh tensor (the full-width rows can be reused); width 0 and first
    ``N_BINS`` when no code is used."""
    # counts are never negative, so "max > 0" is "any": amax is the cheaper reduction
    used = torch.nonzero(counts[:, :N_BINS].amax(0)).reshape(-1)
    if not used.numel():
        return N_BINS, counts[:, N_BINS:].clone()
    first, last = int(used[0]), int(used[-1])
    return first, torch.cat((counts[:, first : last + 1], counts[:, N_BINS:]), dim=1)
