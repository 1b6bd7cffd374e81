"""The weight broadcaster (DESIGN.md, "Weights"): one Ray actor owning the latest policy weights.

The learner hands it ``(version, flat float32 numpy buffer)``; the broadcaster ``ray.put``s the
buffer itself, so the published weights are owned by this actor and survive a learner crash
(ray_notes.md: an object dies with its owner). Rollout workers call ``pull_if_newer(my_version)``
between decisions and fetch the buffer once per version. Versions only grow: a publish at or below
the current version is refused, and ``highest_version`` lets a restarted learner continue above it.
"""

from __future__ import annotations

import time

import numpy as np
import ray


class WeightBroadcaster:
    def __init__(self) -> None:
        self.version = -1
        self.ref: ray.ObjectRef | None = None
        self.num_parameters = 0
        self.published_at = 0.0
        self.publishes = 0

    def publish(self, version: int, flat: np.ndarray) -> dict:
        """Own and serve ``flat`` as ``version``. Returns publish timing (seconds)."""
        t0 = time.perf_counter()
        if version <= self.version:
            raise ValueError(f"publish of version {version} refused: version {self.version} is already "
                             "published (versions only grow)")
        self.ref = ray.put(np.ascontiguousarray(flat, dtype=np.float32))
        self.version = int(version)
        self.num_parameters = int(flat.size)
        self.published_at = time.time()
        self.publishes += 1
        return {"put_s": time.perf_counter() - t0, "version": self.version}

    def pull_if_newer(self, version: int) -> tuple[int, list[ray.ObjectRef] | None]:
        """``(latest version, [ref])`` when newer than ``version``, else ``(version, None)``.
        The ref is wrapped in a list so that Ray hands it over unresolved (no copy here)."""
        if self.ref is not None and self.version > version:
            return self.version, [self.ref]
        return version, None

    def highest_version(self) -> int:
        return self.version

    def stats(self) -> dict:
        return {"version": self.version, "num_parameters": self.num_parameters,
                "publishes": self.publishes, "published_at": self.published_at}
