"""Per-episode Parquet files, written by a background thread off the episode buffer's event loop.

The buffer receives one episodes RecordBatch per GRPO group (G rows: returns, reward terms, metrics,
trajectory). Writing each as its own Parquet file inside the buffer's asyncio loop cost ~1.3 ms per
group on the sandbox, 0.6 s per iteration at 512 groups: time in which the buffer answered neither
the learner (``take_shard``, ``on_published``) nor the rollout workers (new requests). Here the write
is queued and returns at once; a single thread drains the queue and writes whatever is waiting as one
file (up to ``max_groups_per_file`` groups), so a busy run writes a few large files instead of
thousands of 16-row ones.

Files are ``episodes-<start time>-<pid>-<seq>.parquet``: a resumed run (a new buffer in the same run
directory) adds files beside the earlier ones and never overwrites them. Each file is written to a
temporary name and renamed, so a reader never sees half a file. A failed write (disk full, a path that
is not a directory) does not stop training: :attr:`EpisodeWriter.error` names the file and the
cause, and the buffer's stats carry it to the run summary.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class EpisodeWriter:
    """Queue episode batches with :meth:`write`; :meth:`flush` waits until every queued batch is on disk.

    ``directory``: created on the first write. ``max_groups_per_file``: the most batches one file
    takes (a cap on the memory a write holds)."""

    def __init__(self, directory: str | Path, max_groups_per_file: int = 256):
        if max_groups_per_file < 1:
            raise ValueError(f"EpisodeWriter: max_groups_per_file must be >= 1, got {max_groups_per_file}")
        self.directory = Path(directory)
        self.max_groups = int(max_groups_per_file)
        self.prefix = f"episodes-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.queue: queue.Queue[pa.RecordBatch | None] = queue.Queue()
        self.files = 0              # files written
        self.episodes = 0           # rows written
        self.error: str | None = None  # the first failure: which file, what went wrong
        self._pending = 0           # batches queued and not yet written (or failed)
        self._idle = threading.Condition()
        thread = threading.Thread(target=self._run, name="alpagym-episode-writer", daemon=True)
        thread.start()
        self._thread: threading.Thread | None = thread  # None once closed

    def write(self, batch: pa.RecordBatch) -> None:
        """Queue one group's episodes (ignored when empty); returns at once."""
        if batch is None or batch.num_rows == 0:
            return
        with self._idle:
            if self._thread is None:
                raise RuntimeError(f"EpisodeWriter({self.directory}): write after close")
            self._pending += 1
        self.queue.put(batch)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every batch queued so far is written (or failed); False if ``timeout_s`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self, timeout_s: float | None = None) -> bool:
        """Flush, then stop the thread. Returns what :meth:`flush` returned."""
        done = self.flush(timeout_s)
        with self._idle:
            thread, self._thread = self._thread, None
        if thread is not None:
            self.queue.put(None)
            thread.join(timeout=timeout_s)
        return done

    def stats(self) -> dict:
        return {"episode_files": self.files, "episodes_written": self.episodes, "episodes_queued": self._pending,
                "episode_write_error": self.error}

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batches = [first]
            while len(batches) < self.max_groups:  # everything already waiting goes into the same file
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this file
                    break
                batches.append(nxt)
            self._write(batches)
            with self._idle:
                self._pending -= len(batches)
                self._idle.notify_all()

    def _write(self, batches: list[pa.RecordBatch]) -> None:
        # groups of one run share a schema; should one differ (another reward's terms), it gets its own file
        by_schema: dict[pa.Schema, list[pa.RecordBatch]] = {}
        for b in batches:
            by_schema.setdefault(b.schema, []).append(b)
        for same in by_schema.values():
            path = self.directory / f"{self.prefix}-{self.files:06d}.parquet"
            tmp = path.with_name(path.name + ".tmp")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.Table.from_batches(same), tmp)
                tmp.replace(path)
            except Exception as e:  # reported, not raised: the episodes are an output for inspection
                if self.error is None:
                    self.error = f"writing {sum(b.num_rows for b in same)} episodes to {path}: {type(e).__name__}: {e}"
                continue
            self.files += 1
            self.episodes += sum(b.num_rows for b in same)
