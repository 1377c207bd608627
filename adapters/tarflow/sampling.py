"""Sampling a TarFlow with the solvers: the flow in sampling order, sampling, denoising, loading for the planner."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from arflow_solvers import Flow, Permute, Serial, solve

from .._checkpoint import load_checkpoint
from .block import TarFlowARBlock, _check_autocast
from .guidance import Guidance
from .model import TarFlow, unpatchify

__all__ = ["as_flow", "sample", "denoise", "load_for_planning"]


class _ScaleByStd:
    """Multiply patch noise by the prior's standard deviation `var.sqrt()` (`(T, D)`)."""

    __name__ = "ScaleByStd"

    def __init__(self, std: Tensor):
        self.std = std

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        return x * self.std.to(x.dtype)


class _Unpatchify:
    """Patches `(B, T, D)` to images `(B, C, H, W)`."""

    __name__ = "Unpatchify"

    def __init__(self, img_size: int, patch_size: int):
        self.img_size, self.patch_size = img_size, patch_size

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        return unpatchify(x, self.img_size, self.patch_size)


def as_flow(
    model: TarFlow,
    y: Tensor | None = None,
    guidance: float = 0.0,
    guide_what: str = "ab",
    attn_temp: float = 1.0,
    annealed_guidance: bool = False,
    autocast: torch.dtype | None = None,
) -> Flow:
    """A TarFlow in sampling order, as a [`Flow`][arflow_solvers.Flow] for the solvers.

    Steps: scale by `var.sqrt()`, then per block of `reversed(model.blocks)` its
    [`TarFlowARBlock`][arflow_solvers.adapters.tarflow.TarFlowARBlock] (between two flips for flipped
    blocks), then un-patchify. Flow block 0 is `model.blocks[-1]`. The flow maps `(B, T, D)`
    patch noise to `(B, C, H, W)` images; `cond` given to the solve (class labels) overrides
    `y`.

    References:
        Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
        https://arxiv.org/abs/2412.06329

    Arguments:
        model: the TarFlow.
        y: default class labels `(B,)` when the solve gets `cond=None`.
        guidance: classifier-free guidance weight (0: off), as in `TarFlow.reverse`.
        guide_what: `'a'` (scale), `'b'` (shift) or `'ab'`, as in `TarFlow.reverse`.
        attn_temp: attention temperature of the unconditional pass.
        annealed_guidance: ramp the guidance weight along each block's sequence.
        autocast: `torch.bfloat16` (or `torch.float16`) to sample as the public sampler does under
            `torch.autocast("cuda", torch.bfloat16)`: a float32 model and iterate, the transformer
            passes under `torch.autocast` (linear layers and attention in that dtype, layer norms,
            residual stream and softmax accumulation in float32), keys and values cached in that
            dtype, and `(mu, log_sigma)` returned in float32, so the guidance, `exp` and the
            affine update run in float32. `None` (default): everything in the model's dtype.

    Examples:
        >>> model = TarFlow(1, 8, 2, channels=64, num_blocks=2, layers_per_block=1)
        >>> as_flow(model).num_blocks
        2
        >>> as_flow(model, autocast=torch.bfloat16).blocks[0].autocast
        torch.bfloat16
    """
    if not isinstance(model, TarFlow):
        raise TypeError(f"model must be a TarFlow; got {type(model).__name__}")
    if model.num_classes == 0 and (y is not None or guidance):
        what = "labels y" if y is not None else f"guidance={guidance}"
        raise ValueError(f"{what} given, but the TarFlow is unconditional (num_classes=0): labels "
                         "would be ignored and guidance would double the cost for nothing")
    _check_autocast(autocast)
    settings = Guidance(float(guidance), guide_what, float(attn_temp), bool(annealed_guidance))
    flip = Permute(list(range(model.num_patches))[::-1])
    steps: list[Any] = [_ScaleByStd(model.var.sqrt())]
    for block in reversed(model.blocks):
        ar = TarFlowARBlock(block, settings, y, autocast)
        steps += [flip, ar, flip] if block.flip else [ar]
    steps.append(_Unpatchify(model.img_size, model.patch_size))
    return Flow(steps)


def sample(
    model: TarFlow,
    z: Tensor,
    plan: Any = None,
    y: Tensor | None = None,
    guidance: float = 0.0,
    attn_temp: float = 1.0,
    denoise: bool = True,
    noise_std: float = 0.05,
    guide_what: str = "ab",
    annealed_guidance: bool = False,
    *,
    throw: bool = True,
    autocast: torch.dtype | None = None,
) -> Tensor:
    """Sample images with a plan, then (by default) take the denoising score step.

    References:
        Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
        https://arxiv.org/abs/2412.06329

    Arguments:
        model: the TarFlow.
        z: `(B, T, D)` standard normal patch noise.
        plan: a [`Plan`][arflow_solvers.Plan], a solver or a plan string; `None`: `Serial()`.
        y: `(B,)` class labels or `None`.
        guidance: classifier-free guidance weight (0: off), as in `TarFlow.reverse`.
        attn_temp: attention temperature of the unconditional pass.
        denoise: apply [`denoise`][arflow_solvers.adapters.tarflow.denoise] to the result.
        noise_std: the training noise std used by the denoising step.
        guide_what: `'a'` (scale), `'b'` (shift) or `'ab'`, as in `TarFlow.reverse`.
        annealed_guidance: ramp the guidance weight along each block's sequence.
        throw: raise [`SolveError`][arflow_solvers.SolveError] (which carries the Solution)
            if some samples are not finite; `False` returns them as NaN.
        autocast: `torch.bfloat16` to sample under mixed precision as the public sampler does
            (see [`as_flow`][arflow_solvers.adapters.tarflow.as_flow]); the denoising step runs
            in the model's dtype.

    Returns:
        `(B, C, H, W)` images.
    """
    if denoise:
        _check_noise_std(noise_std)  # before the solve, not after it
    _check_patch_noise(model, z)
    flow = as_flow(model, y=None, guidance=guidance, guide_what=guide_what, attn_temp=attn_temp,
                   annealed_guidance=annealed_guidance, autocast=autocast)
    if model.num_classes == 0 and y is not None:
        as_flow(model, y=y)  # refuses labels for an unconditional model
    x = solve(flow, z, Serial() if plan is None else plan, cond=y, throw=throw).x
    return _score_step(model, x, y, noise_std) if denoise else x


def _check_patch_noise(model: TarFlow, z: Any) -> None:
    """Raise naming the expected shape unless `z` is `(B, T, D)` patch noise for `model`."""
    expected = (model.num_patches, model.in_channels * model.patch_size**2)
    if isinstance(z, Tensor) and z.dim() == 4:
        raise ValueError(f"z must be patch noise (B, T={expected[0]}, D={expected[1]}); got an image-shaped "
                         f"{tuple(z.shape)} tensor: draw torch.randn(B, {expected[0]}, {expected[1]}) or "
                         "use model.patchify(z)")
    if isinstance(z, Tensor) and (z.dim() != 3 or tuple(z.shape[1:]) != expected):
        raise ValueError(f"z must be patch noise (B, T={expected[0]}, D={expected[1]}); got {tuple(z.shape)}")


def denoise(model: TarFlow, x: Tensor, y: Tensor | None = None, noise_std: float = 0.05) -> Tensor:
    r"""One score step $x + \sigma^2 \nabla_x \log p(x)$ removing the training noise.

    TarFlow is trained on images plus Gaussian noise of std $\sigma$; by Tweedie's formula
    this step estimates the clean image (the public sampling notebook's denoising step).

    References:
        Normalizing Flows are Capable Generative Models (Zhai et al., 2024),
        https://arxiv.org/abs/2412.06329

    Arguments:
        model: the TarFlow.
        x: `(B, C, H, W)` samples.
        y: class labels used for sampling, or `None`.
        noise_std: $\sigma$, the std of the training noise augmentation.

    Returns:
        `(B, C, H, W)` denoised images.
    """
    _check_noise_std(noise_std)
    return _score_step(model, x, y, noise_std)


def _check_noise_std(noise_std: float) -> None:
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0; got {noise_std}")


def _score_step(model: TarFlow, x: Tensor, y: Tensor | None, noise_std: float) -> Tensor:
    """`x + noise_std**2 * grad log p(x | y)`, the density `N(z; 0, I)` times the flow's Jacobian."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        z, _, logdets = model(x, y)
        per_sample = z[0].numel()  # logdets are means over the dimensions of a sample
        log_p = -0.5 * z.pow(2).flatten(1).sum(1) + per_sample * logdets
        (grad,) = torch.autograd.grad(log_p.sum(), [x])
    return (x + noise_std**2 * grad).detach()


def load_for_planning(path: str, batch: int, seed: int, device: str, *,
                      trust_pickle: bool = False) -> tuple[Flow, Tensor, Any]:
    """Load a checkpoint for `arflow-solvers plan CKPT --model tarflow`.

    Reads the format `examples/train_tarflow.py` saves (a dict with `config`, the `TarFlow`
    keyword arguments, and `state_dict`; `weights_only=True`). Returns the flow of
    [`as_flow`][arflow_solvers.adapters.tarflow.as_flow] (no guidance), standard normal patch noise
    `(batch, T, D)` drawn from a generator seeded with `seed`, and the conditioning: random
    labels in `[0, num_classes)` from the same generator for a class-conditional model,
    else `None`.

    Arguments:
        path: checkpoint file.
        batch: calibration batch size (>= 1).
        seed: seed of the noise and labels.
        device: where the model and tensors go (`'cpu'`, `'cuda'`, ...).
        trust_pickle: also load a file that holds pickled Python objects besides tensors.
            Unpickling runs code from the file: only for files you trust.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `batch` is not an int >= 1, or the file is unreadable (truncated, another
            format), holds pickled objects while `trust_pickle` is False, or is not a
            checkpoint of `examples/train_tarflow.py`; each message names the file.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1; got {batch!r}")
    ckpt = load_checkpoint(path, trust_pickle)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        keys = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else "-"
        raise ValueError(
            f"{path} is not a checkpoint of examples/train_tarflow.py (a dict with 'config' and "
            f"'state_dict'); got {type(ckpt).__name__} with keys {keys} (an nflows checkpoint? use --model nflows)"
        )
    model = TarFlow(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    dim = model.blocks[0].in_channels
    z = torch.randn(batch, model.num_patches, dim, generator=generator).to(device)
    cond = None
    if model.num_classes:
        cond = torch.randint(0, model.num_classes, (batch,), generator=generator).to(device)
    return as_flow(model), z, cond
