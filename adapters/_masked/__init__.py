"""The shared masked-autoregressive layer: every MADE-like adapter is built on it.

- [`network`][arflow_solvers.adapters._masked.network]: a library's masked network as a short
  program of ops, and what its masks imply (autoregressive order, unit degrees);
- [`program`][arflow_solvers.adapters._masked.program]: that program evaluated exactly as the
  library does, or packed (degree-sorted, block-triangular products);
- [`packed`][arflow_solvers.adapters._masked.packed]: the packed products themselves;
- [`weights`][arflow_solvers.adapters._masked.weights]: per-module caches proven by
  element-wise comparison;
- [`block`][arflow_solvers.adapters._masked.block]: the generic block (a library supplies how
  to read its network and its univariate inverse);
- [`steps`][arflow_solvers.adapters._masked.steps]: the conversions between the library's
  layout and each block's order in a wrapped flow.
"""

from .block import ElementwiseInverseBlock, MaskedAffineBlock, MaskedARBlock, check_sampleable
from .network import AddPopped, Analysis, Apply, Context, Masked, MaskedNetwork, Push, analyse, pointwise, take_columns
from .packed import PackedLinear, degree_order
from .program import DenseProgram, PackedProgram
from .steps import ToFeatures, ToSequence, run_stages, sampling_steps
from .weights import WeightCache

__all__ = [
    "AddPopped",
    "Analysis",
    "Apply",
    "Context",
    "DenseProgram",
    "ElementwiseInverseBlock",
    "Masked",
    "MaskedARBlock",
    "MaskedAffineBlock",
    "MaskedNetwork",
    "PackedLinear",
    "PackedProgram",
    "Push",
    "ToFeatures",
    "ToSequence",
    "WeightCache",
    "analyse",
    "check_sampleable",
    "degree_order",
    "pointwise",
    "run_stages",
    "sampling_steps",
    "take_columns",
]
