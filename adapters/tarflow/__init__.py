"""TarFlow: a transformer autoregressive flow, state-dict compatible with the public checkpoints."""

from .block import TarFlowARBlock
from .cache import TarFlowCache  # noqa: F401  (importable as before; documented from its module)
from .guidance import Guidance  # noqa: F401  (idem)
from .layers import MLP, Attention, AttentionBlock
from .model import TarFlow, TarFlowBlock, patchify, unpatchify
from .sampling import as_flow, denoise, load_for_planning, sample

__all__ = [
    "TarFlow",
    "TarFlowBlock",
    "TarFlowARBlock",
    "Attention",
    "MLP",
    "AttentionBlock",
    "as_flow",
    "load_for_planning",
    "sample",
    "denoise",
    "patchify",
    "unpatchify",
]
