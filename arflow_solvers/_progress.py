"""Progress bars when tqdm is installed; the core itself needs only torch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], enabled: bool = True, **options: Any) -> Iterable[T]:
    """`tqdm(iterable, **options)` when enabled and tqdm is importable, else `iterable`."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - depends on the environment
        return iterable
    return tqdm(iterable, **options)
