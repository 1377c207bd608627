"""Sampling a STARFlow with the solvers: the flow in sampling order, sampling, loading for the planner."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from arflow_solvers import Flow, Permute, Serial, solve

from .._checkpoint import load_checkpoint
from ..tarflow.block import _check_autocast
from .block import StarFlowARBlock
from .network import StarFlowBlock
from .guidance import LogitsGuidance
from .model import StarFlow

__all__ = ["as_flow", "sample", "load_for_planning"]


class _Tokens:
    """Latents `(B, C, H, W)` to the token sequence `(B, T, D)` (patches in raster order)."""

    __name__ = "Patchify"

    def __init__(self, model: StarFlow):
        self.model = model

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        return self.model.patchify(x).flatten(1, 2)


class _Latents:
    """The token sequence `(B, T, D)` back to latents `(B, C, H, W)`; optionally recorded."""

    def __init__(self, model: StarFlow, record: list[Tensor] | None = None, last: bool = True):
        self.model, self.record, self.last = model, record, last
        self.__name__ = "Unpatchify" if last else "Record"

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        grid = self.model.grid
        latents = self.model.unpatchify(x.unflatten(1, (grid, grid)))
        if self.record is not None:
            self.record.append(latents)
        return latents if self.last else x


def _settings(model: StarFlow, index: int, guidance: float, attn_temp: float, annealed: bool) -> LogitsGuidance:
    """The guidance of block `index`: the deep block's, or the shallow blocks' (none with `cond_top_only`)."""
    deep = index == len(model.blocks) - 1
    weight = guidance if deep or not model.cond_top_only else 0.0
    return LogitsGuidance(float(weight), "ab", float(attn_temp), bool(annealed))


def _steps(model: StarFlow, y: Tensor | None, y_null: Tensor | None, guidance: float, attn_temp: float,
           annealed: bool, record: list[Tensor] | None, autocast: torch.dtype | None) -> list[Any]:
    flip = Permute(list(range(model.num_patches))[::-1])
    steps: list[Any] = [_Tokens(model)]
    for index in reversed(range(len(model.blocks))):
        block = model.blocks[index]
        if isinstance(block, StarFlowBlock):
            rope = model.feat_rope_gen if index == len(model.blocks) - 1 else model.feat_rope
            settings = _settings(model, index, guidance, attn_temp, annealed)
            ar = StarFlowARBlock(block, rope, settings, y, y_null, autocast)
            steps += [flip, ar, flip] if block.flip else [ar]
        if record is not None and index:
            steps.append(_Latents(model, record, last=False))
    steps.append(_Latents(model, record))
    return steps


def as_flow(model: StarFlow, y: Tensor | None = None, y_null: Tensor | None = None, guidance: float = 0.0,
            attn_temp: float = 1.0, annealed_guidance: bool = False, autocast: torch.dtype | None = None) -> Flow:
    """A STARFlow in sampling order, as a [`Flow`][arflow_solvers.Flow] for the solvers.

    Steps: patchify `(B, C, H, W)` noise to `(B, T, D)` tokens, then per block of
    `reversed(model.blocks)` its
    [`StarFlowARBlock`][arflow_solvers.adapters.starflow.StarFlowARBlock] (between two flips for
    flipped blocks; identity blocks are left out), then un-patchify. Flow block 0 is the deep
    block. The solve's `cond` is the text: `y`, or `(y, y_null)` with guidance; `None` uses
    the `y`, `y_null` given here.

    References:
        STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis
        (Gu et al., 2025), https://arxiv.org/abs/2506.06276

    Arguments:
        model: the STARFlow.
        y: default caption embeddings `(B, L, txt_dim)`.
        y_null: default null-caption embeddings, `(B, L, txt_dim)` or `(1, L, txt_dim)`.
        guidance: guidance weight of the deep block (and of the others unless `cond_top_only`).
        attn_temp: attention temperature of every block's passes.
        annealed_guidance: accepted for the public signature; no effect.
        autocast: `torch.bfloat16` (or `torch.float16`) to sample under mixed precision, as
            under `torch.autocast("cuda", torch.bfloat16)`: a float32 model and iterate, the
            transformer passes under `torch.autocast` (linear layers and attention in that
            dtype), keys and values cached in that dtype, and the `head` outputs returned in
            float32, so the scale, the guidance and the affine update run in float32. `None`
            (default): everything in the model's dtype (the public `sample.py` samples in float32).

    Examples:
        >>> model = StarFlow(4, 8, 1, channels=32, num_blocks=3, layers_per_block=[1, 0, 2], head_dim=16,
        ...                  rope=True, sos=True, txt_size=3, txt_dim=8, cond_top_only=True)
        >>> as_flow(model, guidance=2.0).num_blocks  # the identity block is left out
        2
        >>> as_flow(model, autocast=torch.bfloat16).blocks[0].autocast
        torch.bfloat16
    """
    _check_model(model, guidance)
    _check_autocast(autocast)
    return Flow(_steps(model, y, y_null, guidance, attn_temp, annealed_guidance, None, autocast))


def sample(model: StarFlow, z: Tensor, plan: Any = None, y: Tensor | None = None, y_null: Tensor | None = None,
           guidance: float = 0.0, attn_temp: float = 1.0, annealed_guidance: bool = False,
           return_sequence: bool = False, *, throw: bool = True,
           autocast: torch.dtype | None = None) -> Tensor | list[Tensor]:
    """Sample latents with a plan: the public `reverse` semantics, any solver per block.

    References:
        STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis
        (Gu et al., 2025), https://arxiv.org/abs/2506.06276

    Arguments:
        model: the STARFlow.
        z: `(B, C, H, W)` standard normal noise.
        plan: a [`Plan`][arflow_solvers.Plan], a solver or a plan string; `None`: `Serial()`.
        y: `(B, L, txt_dim)` caption embeddings (text-conditioned models).
        y_null: the null captions' embeddings, `(B, L, txt_dim)` or `(1, L, txt_dim)`; needed
            with guidance.
        guidance: guidance weight (0: off), the public `logits_guided` rule.
        attn_temp: attention temperature of every pass.
        annealed_guidance: accepted for the public signature; no effect.
        return_sequence: return `[z, after the deep block, after each further block]`.
        throw: raise [`SolveError`][arflow_solvers.SolveError] (which carries the Solution)
            if some samples are not finite; `False` returns them as NaN.
        autocast: `torch.bfloat16` to sample under mixed precision (see
            [`as_flow`][arflow_solvers.adapters.starflow.as_flow]); the latents stay float32.

    Returns:
        `(B, C, H, W)` latents, or the list of `return_sequence`.
    """
    _check_model(model, guidance)
    _check_autocast(autocast)
    _check_noise(model, z)
    y = model.check_text(y, z.shape[0])
    if guidance > 0 and y_null is None:
        raise ValueError("guidance > 0 needs y_null, the null captions' embeddings (the public code's empty "
                         "caption), or reverse(z, torch.cat([y, y_null]), guidance)")
    record: list[Tensor] | None = [z] if return_sequence else None
    flow = Flow(_steps(model, None, None, guidance, attn_temp, annealed_guidance, record, autocast))
    cond = y if y is None or not guidance else (y, y_null)
    x = solve(flow, z, Serial() if plan is None else plan, cond=cond, throw=throw).x
    return record if record is not None else x


def _check_model(model: Any, guidance: float) -> None:
    """Raise unless `model` is a STARFlow that can take guidance `guidance`."""
    if not isinstance(model, StarFlow):
        raise TypeError(f"model must be a StarFlow; got {type(model).__name__}")
    if guidance and model.txt_dim == 0:
        raise ValueError(f"guidance={guidance} given, but the STARFlow is unconditional (txt_dim=0)")


def _check_noise(model: StarFlow, z: Any) -> None:
    """Raise naming the expected shape unless `z` is `(B, C, H, W)` noise for `model`."""
    expected = (model.in_channels, model.img_size, model.img_size)
    if not isinstance(z, Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != expected:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        video = " (video is not supported)" if isinstance(z, Tensor) and z.dim() == 5 else ""
        raise ValueError(f"z must be latent noise (B, C={expected[0]}, H={expected[1]}, W={expected[2]}); "
                         f"got {shape}{video}")


def load_for_planning(path: str, batch: int, seed: int, device: str, *,
                      trust_pickle: bool = False) -> tuple[Flow, Tensor, Any]:
    """Load a checkpoint for `arflow-solvers plan CKPT --model starflow`.

    Reads a dict with `config` (the `StarFlow` / public `Model` keyword arguments) and
    `state_dict` (`weights_only=True`), such as the tests' fixture. Returns the flow of
    [`as_flow`][arflow_solvers.adapters.starflow.as_flow] (no guidance), standard normal noise
    `(batch, C, H, W)` from a generator seeded with `seed`, and, for a text-conditioned model,
    standard normal stand-ins for caption embeddings `(batch, txt_size, txt_dim)` from the same
    generator (a plan for real captions is better calibrated on their embeddings, through the
    Python API), else `None`.

    Arguments:
        path: checkpoint file.
        batch: calibration batch size (>= 1).
        seed: seed of the noise and text.
        device: where the model and tensors go.
        trust_pickle: also load a file holding pickled Python objects (runs code from it).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `batch` is not an int >= 1, or the file is unreadable or not such a dict.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1; got {batch!r}")
    ckpt = load_checkpoint(path, trust_pickle)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and "state_dict" in ckpt):
        raise ValueError(f"{path} is not a STARFlow checkpoint: expected a dict with 'config' (the Model "
                         "arguments) and 'state_dict'")
    model = StarFlow(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, model.in_channels, model.img_size, model.img_size, generator=generator)
    cond = None
    if model.txt_dim:
        cond = torch.randn(batch, model.txt_size, model.txt_dim, generator=generator).to(device)
    return as_flow(model), z.to(device), cond
