"""One simulator tick as a CUDA graph: hundreds of small kernels launched as one.

A drivesim tick is a few hundred element-wise and gather kernels over ``[B, ...]`` tensors; on a GPU
its time is launch overhead, not arithmetic (about 40 ms per decision whatever B up to 16k, see
BENCHMARKS.md), and when other processes share the GPU every launch also waits for a time slice.
Captured once (https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs) and replayed, the tick
costs one launch plus one copy per state tensor.

The simulator keeps its state as attributes that the tick *reassigns* (``self.pose = ...``), and
``reset`` / ``step`` may reassign or write them in place between ticks. So the graph owns one
static input buffer per state tensor: before each replay the current attribute is copied into it
(skipped when it already is that buffer), after the replay the attribute points at the graph's
output, exactly as an eager tick would leave it. Outputs are overwritten by the next replay, which
matches the eager contract that the tick's results are consumed before the next tick.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _get(obj: Any, name: str) -> torch.Tensor:
    """``obj.a.b`` or ``obj.a[b]`` (a dict attribute) for ``name = "a.b"``."""
    head, _, rest = name.partition(".")
    value = getattr(obj, head)
    if not rest:
        return value
    return value[rest] if isinstance(value, dict) else getattr(value, rest)


def _set(obj: Any, name: str, tensor: torch.Tensor) -> None:
    head, _, rest = name.partition(".")
    if not rest:
        setattr(obj, head, tensor)
        return
    holder = getattr(obj, head)
    if isinstance(holder, dict):
        holder[rest] = tensor
    else:
        setattr(holder, rest, tensor)


class GraphedTick:
    """``tick(live) -> values`` of ``obj``, replayed from a CUDA graph over the named state tensors.

    ``state`` names every tensor the tick reads or reassigns (dotted for dict entries and fields of
    attribute objects). If capture fails (a host sync or a data-dependent shape inside the tick),
    a warning names the cause and the eager tick is used from then on: slower, never wrong."""

    def __init__(self, obj: Any, tick: Callable[[torch.Tensor], torch.Tensor], state: Sequence[str]):
        self.obj, self.tick, self.state = obj, tick, list(state)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.live: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __call__(self, live: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.tick(live)
        # a state tensor that changed shape (a new action horizon) needs a new capture
        if (self.graph is None or not self._load_inputs()) and not self._try_capture(live):
            return self.tick(live)
        assert self.live is not None and self.values is not None  # set by _capture
        self.live.copy_(live)
        self.graph.replay()  # type: ignore[union-attr]
        for name, out in self.outputs.items():
            _set(self.obj, name, out)
        return self.values

    def _load_inputs(self) -> bool:
        """Copy the current state into the graph's inputs; False if a tensor's shape changed."""
        for name in self.state:
            current, buf = _get(self.obj, name), self.inputs[name]
            if current is buf:
                continue
            if current.shape != buf.shape:
                return False
            buf.copy_(current)
        return True

    def _try_capture(self, live: torch.Tensor) -> bool:
        """Capture (the inputs then hold the current state); on failure warn and go eager for good."""
        try:
            with torch.cuda.device(live.device):  # capture on the env's GPU, whichever is current
                self._capture(live)
            return True
        except Exception as e:  # fall back, loudly
            self.failed = True
            self._restore()
            warnings.warn(f"drivesim: the tick could not be captured as a CUDA graph ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly", stacklevel=3)
            return False

    def _restore(self) -> None:
        for name, buf in self.inputs.items():
            _set(self.obj, name, buf)

    def _capture(self, live: torch.Tensor) -> None:
        self.inputs = {name: _get(self.obj, name).clone() for name in self.state}
        self.live = live.clone()
        self._restore()
        # warm up on a side stream (lazy initialisation must not happen during capture); the tick
        # only reassigns state, so putting the inputs back undoes each warm-up run
        side = torch.cuda.Stream(device=live.device)
        side.wait_stream(torch.cuda.current_stream(live.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.tick(self.live)
                self._restore()
        torch.cuda.current_stream(live.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads stepping their own envs (the AlpaSim runtime server's sessions)
        # keep working while this one captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            values = self.tick(self.live)
        self.outputs = {name: _get(self.obj, name) for name in self.state}
        self.values = values
        self.graph = graph
        self._restore()  # capture ran nothing: the first replay starts from the inputs
