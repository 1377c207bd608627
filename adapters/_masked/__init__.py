"""The shared masked-autoregressive layer: packed masked products and proven weight snapshots."""

from .packed import PackedLinear, degree_order
from .weights import WeightCache

__all__ = ["PackedLinear", "WeightCache", "degree_order"]
