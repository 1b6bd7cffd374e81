"""Host -> device copies through pinned staging buffers, double-buffered.

The learner's load phase moves every decision-row column of an iteration (gigabytes, in one Arrow
chunk per GRPO group) from the object store's shared memory to the GPU. A copy from pageable memory
is synchronous and goes through the driver's own small staging buffers: thousands of such copies of
a few hundred KB each ran at ~1.5 GB/s. Here the chunks are packed into a few large pinned buffers
("slots") on the host and each slot goes to the device in one asynchronous DMA; while one slot is
in flight the host fills the next, so the host memcpy and the transfer overlap.

Pinned memory is slow to allocate and scarce, so :func:`staging_for` keeps one :class:`PinnedStaging`
per CUDA device for the whole process, reused by every load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

DEFAULT_SLOT_BYTES = 64 * 2**20
"""Large enough that the per-copy cost (~10 us) vanishes against the transfer; small enough that two
slots are a trifle of pinned memory."""


class PinnedStaging:
    """``slots`` host buffers of ``slot_bytes`` bytes each (``uint8``, pinned if ``pin``), allocated on
    the first :meth:`upload`, reused round-robin by every later one.

    Each slot has a CUDA event recorded after its copy to the device; a slot is refilled only once its
    event has completed, so the host never overwrites bytes a DMA still reads. With two slots the host
    fills one while the other is in flight.

    ``pin=False`` (plain host memory) and a CPU ``out`` make the same packing run synchronously
    without CUDA (the tests on CPU machines).

    Thread-safe (one upload at a time): the learner loads in a prefetch thread, and the staging is
    shared by the process.

    ``wait_s`` (seconds the host spent waiting for a slot's transfer to finish) and ``bytes`` (bytes
    uploaded) add up over the instance's life: how much of an upload is the transfer rather than the
    host memcpy (``scripts/bench_load.py``)."""

    def __init__(self, slot_bytes: int = DEFAULT_SLOT_BYTES, slots: int = 2, pin: bool = True):
        if slot_bytes < 1 or slots < 1:
            raise ValueError(f"PinnedStaging: slot_bytes={slot_bytes} and slots={slots} must be >= 1")
        self.slot_bytes = int(slot_bytes)
        self.num_slots = int(slots)
        self.pin = pin
        self._buffers: list[torch.Tensor] = []  # [slot_bytes] uint8 each, once allocated
        self._events: list[torch.cuda.Event | None] = [None] * self.num_slots
        self._next = 0  # the slot the next fill takes (round-robin across uploads too)
        self._lock = threading.Lock()
        self.wait_s = 0.0
        self.bytes = 0

    def upload(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        """Copy ``parts`` into ``out``: parts ``[rows_i, *shape]`` (CPU tensors of ``out.dtype``; contiguous,
        else copied once more) fill ``out`` ``[sum rows_i, *shape]`` exactly, in order, as
        ``torch.cat(parts)`` would (only the byte counts are checked). ValueError on another dtype or total.

        ``out`` (contiguous; CUDA, or CPU for the synchronous path) holds the data once the work queued
        on its device's current stream by this call completes: the copies to the device are
        asynchronous, queued on that stream; no device-wide synchronisation (the learner loads on a
        side stream). The parts can be freed as soon as this returns: their bytes are in the slots."""
        for i, p in enumerate(parts):
            if p.dtype != out.dtype:
                raise ValueError(f"PinnedStaging.upload: part {i} is {p.dtype}, out is {out.dtype}")
            if p.device.type != "cpu":
                raise ValueError(f"PinnedStaging.upload: part {i} is on {p.device}, not the host")
        total = sum(p.numel() for p in parts) * out.element_size()
        if total != out.numel() * out.element_size():
            raise ValueError(f"PinnedStaging.upload: parts hold {total} bytes, out holds "
                             f"{out.numel() * out.element_size()} bytes ({tuple(out.shape)} {out.dtype})")
        if not out.is_contiguous():
            raise ValueError(f"PinnedStaging.upload: out {tuple(out.shape)} must be contiguous")
        if total == 0:
            return
        dst = out.reshape(-1).view(torch.uint8)  # [total]: a view (out is contiguous)
        with self._lock:
            self._allocate()
            stream = torch.cuda.current_stream(dst.device) if dst.is_cuda else None
            slot = -1   # the slot being filled, -1 for none
            fill = 0    # its bytes so far
            start = 0   # offset in dst of its first byte
            for part in parts:
                src = part.reshape(-1).view(torch.uint8)  # [part bytes]
                pos = 0
                while pos < src.numel():
                    if slot < 0:
                        slot = self._acquire()
                    k = min(src.numel() - pos, self.slot_bytes - fill)
                    self._buffers[slot][fill:fill + k].copy_(src[pos:pos + k])
                    fill += k
                    pos += k
                    if fill == self.slot_bytes:
                        self._issue(slot, dst, start, fill, stream)
                        start += fill
                        slot, fill = -1, 0
            if fill:  # the last, partly filled slot: its event recorded too, so the next upload waits on it
                self._issue(slot, dst, start, fill, stream)
            self.bytes += total

    def _allocate(self) -> None:
        if not self._buffers:
            self._buffers = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=self.pin)
                             for _ in range(self.num_slots)]

    def _acquire(self) -> int:
        """The next slot, once its previous transfer (if any) has finished reading it."""
        slot = self._next
        self._next = (slot + 1) % self.num_slots
        event = self._events[slot]
        if event is not None:
            t0 = time.perf_counter()
            event.synchronize()
            self.wait_s += time.perf_counter() - t0
        return slot

    def _issue(self, slot: int, dst: torch.Tensor, start: int, n: int, stream) -> None:
        """Queue the copy of the slot's first ``n`` bytes to ``dst[start:start + n]``; on CUDA record the
        slot's event behind it (on the stream ``copy_`` uses: the destination device's current one)."""
        dst[start:start + n].copy_(self._buffers[slot][:n], non_blocking=stream is not None)
        if stream is not None:
            event = self._events[slot]
            if event is None:
                event = self._events[slot] = torch.cuda.Event()
            event.record(stream)


_STAGINGS: dict[torch.device, PinnedStaging] = {}
_STAGINGS_LOCK = threading.Lock()


def staging_for(device: torch.device | str) -> PinnedStaging | None:
    """The process's :class:`PinnedStaging` for a CUDA ``device`` (created on first request, pinned
    memory allocated on first upload, kept for the process's life); None for any other device, which
    needs no staging."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _STAGINGS_LOCK:
        if device not in _STAGINGS:
            _STAGINGS[device] = PinnedStaging()
        return _STAGINGS[device]
