"""Conformance checks for third-party blocks: run them on your own block before solving with it.

Each check evaluates the block on a noise batch `z` (`(B, T, D)`, in the dtype you want the
block checked in: nothing is cast) and raises [`ConformanceError`][arflow_solvers.testing.ConformanceError]
(an `AssertionError`, so it reads as a failed test under pytest) naming the block, the
check, the offending positions and the size of the violation. Run them in float64 where
the block allows it: the tolerances scale with the dtype's machine epsilon.

```python
from arflow_solvers.testing import check_block

def test_my_block_is_a_valid_autoregressive_block():
    check_block(MyBlock().double(), torch.randn(3, MyBlock.seq_len, 4, dtype=torch.float64))
```
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..protocol import CachedARBlock
from ._common import ConformanceError, validate
from .cached import check_cached_range
from .causal import check_causal
from .exact import check_exact_at_bound

__all__ = [
    "ConformanceError",
    "check_block",
    "check_cached_range",
    "check_causal",
    "check_exact_at_bound",
]


def check_block(block: Any, z: Tensor, cond: Any = None, *, atol: float | None = None) -> list[str]:
    """Run every check that applies to the block's protocols; return the names of those run.

    `check_causal` and `check_exact_at_bound` always, `check_cached_range` for a
    [`CachedARBlock`][arflow_solvers.CachedARBlock]. Causality runs first, since the other
    checks' failures usually follow from a causality violation.

    Arguments:
        block: the block to check.
        z: `(B, T, D)` noise in the dtype to check in (float64 recommended).
        cond: the block's conditioning for this batch, or `None`.
        atol: passed to every check (`None`: each check's default).

    Raises:
        ConformanceError: the first check that failed, naming the positions.
        TypeError: `block` satisfies neither protocol, or `z` is not a floating tensor.
        ValueError: `z` is not `(B, T, D)` with `T = block.seq_len`.

    Examples:
        >>> import torch
        >>> class Shift:  # x_t = z_t + x_{t-1}
        ...     seq_len = 5
        ...     def affine(self, x, cond=None):
        ...         return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1), torch.zeros_like(x)
        >>> check_block(Shift(), torch.randn(3, 5, 2, dtype=torch.float64))
        ['check_causal', 'check_exact_at_bound']
    """
    validate(block, z, "check_block")
    done = []
    check_causal(block, z, cond, atol=atol)
    done.append("check_causal")
    if isinstance(block, CachedARBlock):
        check_cached_range(block, z, cond, atol=atol)
        done.append("check_cached_range")
    check_exact_at_bound(block, z, cond, atol=atol)
    done.append("check_exact_at_bound")
    return done
