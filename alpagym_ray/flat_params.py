"""Weights as one flat buffer: what the learner publishes and the rollout workers load.

The buffer is every floating-point entry of ``model.state_dict()`` (parameters and persistent
buffers such as a policy's anchors), flattened in ``state_dict`` order and concatenated. Two models
built from the same config have the same layout, so the receiver copies slices back in place.

This is generic model plumbing (any ``nn.Module``), not part of an algorithm, so it lives in the
runtime core: the learner and the rollout workers use it without knowing the concrete policy.
Publishing reuses one host buffer (``flatten_params(model, out=host)``, ``host`` from
:func:`host_buffer`): at 128 M parameters a fresh buffer per publish would allocate 512 MB each time.
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


def host_buffer(model: nn.Module, pin: bool | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty 1-D host tensor ``[flat_size(model)]`` to pass as ``out`` to :func:`flatten_params`.

    ``pin`` (default: whether the model has an entry on a CUDA device) allocates page-locked memory,
    so device-to-host copies into it run asynchronously at full bandwidth."""
    entries = _float_entries(model)
    if pin is None:
        pin = any(v.is_cuda for _, v in entries)
    return torch.empty(sum(v.numel() for _, v in entries), dtype=dtype, pin_memory=bool(pin))


def flatten_params(model: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
    """The model's floating-point state as one detached 1-D tensor ``[flat_size(model)]``.

    Without ``out``: a new tensor on the model's device (the entries must share one dtype, else
    TypeError). With ``out``: the entries are copied into it in place and ``out`` is returned; it must
    be a 1-D floating-point tensor of ``flat_size(model)`` elements, on any device and of any floating
    dtype (``copy_`` converts), so a GPU model is written straight into a pinned host buffer that the
    caller keeps from one publish to the next. Raises ValueError (size) or TypeError (dtype)."""
    entries = _float_entries(model)
    if out is None:
        dtypes = {v.dtype for _, v in entries}
        if len(dtypes) > 1:
            raise TypeError(f"flatten_params: mixed dtypes {sorted(map(str, dtypes))} in the state dict")
        with torch.no_grad():
            return torch.cat([v.detach().reshape(-1) for _, v in entries])
    total = sum(v.numel() for _, v in entries)
    if out.ndim != 1 or out.numel() != total:
        raise ValueError(f"flatten_params: out of shape {list(out.shape)} does not match the model's {total} "
                         f"floating-point elements ({len(entries)} tensors); allocate it with host_buffer(model)")
    if not out.is_floating_point():
        raise TypeError(f"flatten_params: out must be a floating-point tensor, got {out.dtype}")
    # device -> pinned host copies can run asynchronously; one synchronisation at the end below
    non_blocking = out.device.type == "cpu" and out.is_pinned()
    sources = set()
    offset = 0
    with torch.no_grad():
        for _, v in entries:
            n = v.numel()
            out[offset : offset + n].copy_(v.detach().reshape(-1), non_blocking=non_blocking and v.is_cuda)
            if v.is_cuda:
                sources.add(v.device)
            offset += n
    if non_blocking:
        for device in sources:  # the copies were queued on each source device's current stream
            torch.cuda.current_stream(device).synchronize()
    return out


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
