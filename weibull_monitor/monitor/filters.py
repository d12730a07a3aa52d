"""Which parameters a monitor watches: ``include`` / ``exclude`` as glob patterns, a regex or a callable."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

__all__ = ["NameFilter", "name_filter"]

NameFilter = str | Iterable[str] | re.Pattern[str] | Callable[[str], bool] | None


def name_filter(spec: NameFilter, what: str) -> Callable[[str], bool] | None:
    """A predicate on parameter names: glob pattern(s) (``*.q_proj.weight``), a compiled regex, or a callable."""
    if spec is None:
        return None
    if callable(spec) and not isinstance(spec, re.Pattern):
        return spec
    if isinstance(spec, re.Pattern):
        return lambda name: spec.search(name) is not None
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what}= takes glob patterns (str), a compiled regex or a callable, got {spec!r}")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)
