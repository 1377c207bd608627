"""STARFlow: a text-to-image transformer autoregressive flow, state-dict compatible with the public checkpoints."""

from .block import StarFlowARBlock
from .network import IdentityBlock, StarFlowBlock
from .cache import StarFlowCache  # noqa: F401  (documented from its module)
from .guidance import LogitsGuidance
from .layers import MLP, Attention, AttentionBlock, RMSNorm
from .model import StarFlow, patchify, unpatchify
from .rope import VisionRope
from .sampling import as_flow, load_for_planning, sample

__all__ = [
    "StarFlow",
    "StarFlowBlock",
    "IdentityBlock",
    "StarFlowARBlock",
    "LogitsGuidance",
    "VisionRope",
    "Attention",
    "MLP",
    "AttentionBlock",
    "RMSNorm",
    "as_flow",
    "load_for_planning",
    "sample",
    "patchify",
    "unpatchify",
]
