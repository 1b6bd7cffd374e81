"""Weights as one flat buffer: what GRPO's weight broadcaster ships to rollout workers.

The buffer is every floating-point entry of ``model.state_dict()`` (parameters and persistent
buffers such as the anchors), flattened in ``state_dict`` order and concatenated. Two models built
from the same config have the same layout, so the receiver copies slices back in place.
"""

from __future__ import annotations

import torch
from torch import nn


def _float_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in model.state_dict(keep_vars=True).items() if v.is_floating_point()]


def flat_layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` of the entries in the flat buffer, in order."""
    return [(k, tuple(v.shape)) for k, v in _float_entries(model)]


def flat_size(model: nn.Module) -> int:
    """Number of elements of the flat buffer."""
    return sum(v.numel() for _, v in _float_entries(model))


def flatten_params(model: nn.Module) -> torch.Tensor:
    """A detached 1-D copy ``[flat_size(model)]`` of the model's floating-point state, on its device.

    Raises TypeError when the entries do not share one dtype (the buffer has one dtype)."""
    entries = _float_entries(model)
    dtypes = {v.dtype for _, v in entries}
    if len(dtypes) > 1:
        raise TypeError(f"flatten_params: mixed dtypes {sorted(map(str, dtypes))} in the state dict")
    with torch.no_grad():
        return torch.cat([v.detach().reshape(-1) for _, v in entries])


def load_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a buffer made by :func:`flatten_params` into ``model`` in place (any device or dtype).

    Raises ValueError when the buffer is not 1-D or its size does not match the model's layout."""
    entries = _float_entries(model)
    total = sum(v.numel() for _, v in entries)
    if flat.ndim != 1 or flat.numel() != total:
        raise ValueError(f"load_flat_params: buffer of shape {list(flat.shape)} does not match the "
                         f"model's {total} floating-point elements ({len(entries)} tensors)")
    offset = 0
    with torch.no_grad():
        for _, v in entries:
            n = v.numel()
            v.copy_(flat[offset : offset + n].view(v.shape))
            offset += n
