"""Reading a checkpoint for `arflow-solvers plan`: tensors only, unless the caller trusts the file."""

from __future__ import annotations

import pickle
from typing import Any

import torch

__all__ = ["load_checkpoint"]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or ["no message"])[0][:200]


def _holds_pickled_objects(error: BaseException) -> bool:
    """Whether `torch.load(..., weights_only=True)` failed on Python objects, not on the file."""
    message = str(error).lower()  # "Weights only load failed ... Unsupported global: GLOBAL ..."
    return isinstance(error, pickle.UnpicklingError) and "weights only" in message and "global" in message


def load_checkpoint(path: str, trust_pickle: bool = False) -> Any:
    """`torch.load(path)` on the CPU, with tensors only unless `trust_pickle`.

    Unpickling Python objects runs code from the file, so a file that holds any is refused
    unless the caller trusts it (`arflow-solvers plan --trust-pickle`).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is unreadable (truncated, another format), or holds pickled
            objects while `trust_pickle` is False; the message names the file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises many kinds for a truncated or foreign file
        if not _holds_pickled_objects(error):
            raise ValueError(f"{path} is not a readable torch checkpoint (truncated, or another format): "
                             f"{type(error).__name__}: {_first_line(error)}") from error
        if not trust_pickle:
            raise ValueError(f"{path} holds pickled Python objects, not only tensors; loading it runs code "
                             "from the file, so it is refused. If you trust the file, pass trust_pickle=True "
                             "(arflow-solvers plan --trust-pickle)") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"{path} is not a readable torch checkpoint: {type(error).__name__}: "
                         f"{_first_line(error)}") from error
