"""Reference toy blocks for the tests, written only against the protocols (no base class)."""

from __future__ import annotations

import torch
from torch import Tensor


def shift_right(x: Tensor) -> Tensor:
    """Row t holds x_{t-1}; row 0 holds zeros."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


class CausalMLP:
    """A random strictly-causal MLP: h_t = tanh(sum_{s<t} W1[t, s] x_s + b1_t)."""

    def __init__(self, seq_len: int, dim: int, hidden: int = 8, seed: int = 0,
                 weight_scale: float = 0.7, log_sigma_scale: float = 0.5,
                 dtype: torch.dtype = torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.seq_len, self.dim, self.hidden = seq_len, dim, hidden
        w1 = torch.randn(seq_len * hidden, seq_len * dim, generator=g, dtype=dtype)
        t_out = torch.arange(seq_len).repeat_interleave(hidden)[:, None]
        t_in = torch.arange(seq_len).repeat_interleave(dim)[None, :]
        self.w1 = w1 * (t_in < t_out) * weight_scale / max(1, (seq_len * dim) ** 0.5)
        self.b1 = torch.randn(seq_len * hidden, generator=g, dtype=dtype) * 0.1
        self.w_mu = torch.randn(hidden, dim, generator=g, dtype=dtype) * weight_scale / hidden**0.5
        self.w_s = torch.randn(hidden, dim, generator=g, dtype=dtype) / hidden**0.5
        self.b_mu = torch.randn(seq_len, dim, generator=g, dtype=dtype) * 0.1
        self.log_sigma_scale = log_sigma_scale

    def hidden_of(self, x: Tensor) -> Tensor:
        h = torch.tanh(x.flatten(1) @ self.w1.T + self.b1)
        return h.view(x.shape[0], self.seq_len, self.hidden)

    def affine(self, x: Tensor, cond=None) -> tuple[Tensor, Tensor]:
        h = self.hidden_of(x)
        mu = h @ self.w_mu + self.b_mu
        log_sigma = self.log_sigma_scale * torch.tanh(h @ self.w_s)
        if cond is not None:
            mu = mu + cond.view(-1, 1, 1)
        return mu, log_sigma


class CausalLinear:
    """mu = A x (A strictly lower triangular over positions), constant log-sigma."""

    def __init__(self, seq_len: int, dim: int, seed: int = 0, gain: float = 0.5,
                 dtype: torch.dtype = torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.seq_len = seq_len
        n = seq_len * dim
        a = torch.randn(n, n, generator=g, dtype=dtype)
        t = torch.arange(seq_len).repeat_interleave(dim)
        self.a = a * (t[None, :] < t[:, None]) * gain / max(1, n**0.5)
        self.log_sigma = torch.randn(seq_len, dim, generator=g, dtype=dtype) * 0.2

    def affine(self, x: Tensor, cond=None) -> tuple[Tensor, Tensor]:
        mu = (x.flatten(1) @ self.a.T).view_as(x)
        return mu, self.log_sigma.expand_as(x)


class Recurrence:
    """x_t = exp(log_sigma) z_t + gain * x_{t-1}: expansive when |gain| > 1."""

    def __init__(self, seq_len: int, gain: float, log_sigma: float = 0.0):
        self.seq_len, self.gain, self.ls = seq_len, gain, log_sigma

    def affine(self, x: Tensor, cond=None) -> tuple[Tensor, Tensor]:
        return self.gain * shift_right(x), torch.full_like(x, self.ls)


class Explosive:
    """log_sigma_t = x_{t-1}^2: finite serially for small z, overflows from a large guess."""

    seq_len = 12

    def affine(self, x: Tensor, cond=None) -> tuple[Tensor, Tensor]:
        prev = shift_right(x)
        return 0.5 * prev, prev**2


class CachedMLP:
    """CausalMLP behind the CachedARBlock protocol: rows read the committed prefix from the cache.

    A solver that forgets to commit, commits too early, or passes the wrong `rows` gets a
    wrong answer, because committed positions are read only from the cache.
    """

    def __init__(self, inner: CausalMLP):
        self.inner = inner
        self.seq_len = inner.seq_len
        self.calls: list[tuple[int, int, int]] = []

    def affine(self, x, cond=None):
        return self.inner.affine(x, cond)

    def init_cache(self, z, cond=None):
        return {"x": torch.full_like(z, float("nan")), "upto": 0}

    def affine_range(self, cache, x, start, stop, cond=None, rows=None):
        assert start >= cache["upto"], "asked for rows inside the committed prefix"
        prefix = cache["x"] if rows is None else cache["x"][rows]
        upto = cache["upto"]
        full = torch.cat([prefix[:, :upto], x[:, upto:]], dim=1)
        self.calls.append((x.shape[0], start, stop))
        mu, log_sigma = self.inner.affine(full, cond)
        return mu[:, start:stop], log_sigma[:, start:stop]

    def commit(self, cache, x, upto, cond=None):
        assert upto >= cache["upto"], "commit went backwards"
        cache["x"][:, cache["upto"]:upto] = x[:, cache["upto"]:upto]
        cache["upto"] = upto


def serial_reference(block, z: Tensor, cond=None) -> Tensor:
    """Textbook serial inversion, independent of the library."""
    x = torch.zeros_like(z)
    for t in range(z.shape[1]):
        mu, log_sigma = block.affine(x, cond)
        x[:, t] = torch.exp(log_sigma[:, t]) * z[:, t] + mu[:, t]
    return x


def load_for_planning(path: str, batch: int, seed: int, device: str):
    """A loader for the command line's `--model toys:load_for_planning` (ignores `path`)."""
    from arflow_solvers import Flow, Permute

    blocks = [CausalMLP(10, 2, seed=s, weight_scale=w, dtype=torch.float32) for s, w in ((0, 0.5), (1, 3.0))]
    z = torch.randn(batch, 10, 2, generator=torch.Generator().manual_seed(seed))
    return Flow([blocks[0], Permute(list(range(9, -1, -1))), blocks[1]]), z, None


def randomise(module: torch.nn.Module, seed: int, gain: float = 0.3) -> None:
    """Every parameter drawn from `gain * N(0, 1)`, reproducibly: far from near-identity inits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(gain * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def tiny_tarflow(dtype=torch.float64, num_classes=3, nvp=True, seed=0, layers=2):
    """A small random TarFlow (8x8 images, 2x2 patches: T=16, D=4) whose blocks do something.

    The public initialisation zeroes `proj_out`, which makes every block the identity; here it
    and the class embeddings are random.
    """
    from arflow_solvers.adapters.tarflow import TarFlow

    torch.manual_seed(seed)
    model = TarFlow(1, 8, 2, channels=32, num_blocks=2, layers_per_block=layers, nvp=nvp,
                    num_classes=num_classes, head_dim=16, expansion=2)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)
            block.proj_out.bias.normal_(0, 0.05)
            if block.class_embed is not None:
                block.class_embed.normal_(0, 0.5)
    return model.to(dtype).eval()
