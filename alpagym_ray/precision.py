"""Numeric precision of the policy's forward passes (``topology.precision``).

Acting and learning must compute log-probabilities the same way (GRPO's ratios compare them), so one
setting applies to the rollout workers, the learner ranks and evaluation:

- ``fp32``: plain float32 everywhere.
- ``tf32``: float32 tensors, matrix products on TF32 tensor cores (10-bit mantissa inputs, float32
  accumulation; ``torch.backends.cuda.matmul.allow_tf32``).
- ``bf16``: ``torch.autocast`` to bfloat16 on CUDA (matrix products and convolutions in bf16,
  reductions and normalisations in float32); no loss scaling is needed for bf16. A policy keeps the
  maths that need float32 (densities, log-probs) out of autocast itself, as
  ``learners.trajectory_policy`` does.

On a CPU device every mode runs in float32 (CPU bf16 autocast is slower than float32 on most CPUs).

``topology.compile`` (:func:`maybe_compile`) puts the policy's hot path under ``torch.compile`` in the
same places (workers and learner ranks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import torch

P = TypeVar("P", bound=torch.nn.Module)

PRECISIONS = ("fp32", "tf32", "bf16")
"""Valid values of ``topology.precision``."""


def check_precision(name: str) -> str:
    """``name`` if valid, else ValueError naming the valid ones."""
    if name not in PRECISIONS:
        raise ValueError(f"topology.precision {name!r} unknown; valid: {list(PRECISIONS)}")
    return name


def set_matmul_precision(name: str) -> None:
    """Process-wide: allow TF32 tensor cores for float32 matrix products unless ``name`` is ``fp32``
    (under ``bf16`` the products left in float32 by autocast also use them)."""
    check_precision(name)
    torch.backends.cuda.matmul.allow_tf32 = name != "fp32"
    torch.backends.cudnn.allow_tf32 = name != "fp32"


@contextlib.contextmanager
def autocast(name: str, device: torch.device | str) -> Iterator[None]:
    """The autocast region of a policy call on ``device`` (bf16 on CUDA, nothing otherwise)."""
    check_precision(name)
    if name == "bf16" and torch.device(device).type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def maybe_compile(policy: P, enabled: bool) -> P:
    """``policy.compile()`` when ``topology.compile`` is on. ``nn.Module.compile`` compiles ``forward``;
    a policy whose acting and log-probs share another hot path overrides it (``TrajectoryPolicy``
    compiles its trunk's query output and per-element MLPs). Compilation happens at the first call of
    each input shape."""
    if not isinstance(enabled, bool):
        raise ValueError(f"topology.compile must be true or false, got {enabled!r}")
    if enabled:
        policy.compile()
    return policy
