"""The episode buffer's Parquet writer: nothing queued is lost, files never overwrite one another, a
failed write is reported with its path instead of stopping the run."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alpagym_ray.episode_writer import EpisodeWriter


def group(gid: str, n: int = 4, terms: tuple[str, ...] = ("term.a",)) -> pa.RecordBatch:
    cols = {"episode_id": [f"{gid}/{j}" for j in range(n)], "group_id": [gid] * n,
            "return": [float(j) for j in range(n)], **{t: [0.5] * n for t in terms}}
    return pa.RecordBatch.from_pydict(cols)


def test_every_queued_episode_reaches_disk_in_few_files(tmp_path):
    writer = EpisodeWriter(tmp_path / "episodes", max_groups_per_file=8)
    gate = threading.Lock()
    gate.acquire()
    original = writer._write
    writer._write = lambda batches: (gate.acquire(), gate.release(), original(batches))  # type: ignore[method-assign]
    for i in range(20):
        writer.write(group(f"g{i:03d}"))
    writer.write(pa.RecordBatch.from_pydict({"episode_id": pa.array([], pa.string())}))  # empty: ignored
    assert not writer.flush(timeout_s=0.05)  # the thread holds the first group, 19 wait in the queue
    gate.release()
    assert writer.flush(timeout_s=30)
    files = sorted((tmp_path / "episodes").glob("*.parquet"))
    table = pq.read_table(files)
    assert table.num_rows == 20 * 4 and sorted(set(table.column("group_id").to_pylist())) == [f"g{i:03d}" for i in
                                                                                                 range(20)]
    # the first file took the k groups queued when the thread woke; the 20 - k behind it fill files of at
    # most 8 groups (32 rows): 1 + ceil((20 - k) / 8) <= 4 files for 20 groups
    rows = [pq.read_metadata(f).num_rows for f in files]
    assert 3 <= len(files) <= 4 and max(rows) <= 32 and sum(rows) == 80
    assert writer.stats() == {"episode_files": len(files), "episodes_written": 80, "episodes_queued": 0,
                              "episode_write_error": None}
    assert not list((tmp_path / "episodes").glob("*.tmp"))
    writer.close()
    with pytest.raises(RuntimeError, match="write after close"):
        writer.write(group("late"))


def test_a_second_writer_in_the_same_directory_adds_files(tmp_path, monkeypatch):
    first = EpisodeWriter(tmp_path)
    first.write(group("g0"))
    first.close()
    # a resumed run: a new buffer (another process, or the same second) in the same run directory
    monkeypatch.setattr("os.getpid", lambda: 999999)
    second = EpisodeWriter(tmp_path)
    second.write(group("g0"))  # group ids start again after a resume
    second.close()
    assert len(list(tmp_path.glob("*.parquet"))) == 2
    assert pq.read_table(list(tmp_path.glob("*.parquet"))).num_rows == 8


def test_groups_with_another_schema_get_their_own_file(tmp_path):
    writer = EpisodeWriter(tmp_path)
    writer.write(group("g0"))
    writer.write(group("g1", terms=("term.b",)))
    writer.close()
    tables = [pq.read_table(f) for f in sorted(tmp_path.glob("*.parquet"))]
    assert sorted(t.num_rows for t in tables) == [4, 4]
    assert {("term.a" in t.column_names, "term.b" in t.column_names) for t in tables} == {(True, False), (False, True)}


def test_a_failed_write_is_reported_with_its_path_and_later_ones_go_on(tmp_path):
    blocked = tmp_path / "episodes"
    blocked.write_text("a file where the directory should be")
    writer = EpisodeWriter(blocked)
    writer.write(group("g0"))
    assert writer.flush(timeout_s=30)
    error = writer.stats()["episode_write_error"]
    assert error.startswith(f"writing 4 episodes to {blocked}/episodes-") and "Error" in error
    blocked.unlink()  # the cause goes away: the next groups are written
    writer.write(group("g1"))
    writer.close()
    assert pq.read_table(list(blocked.glob("*.parquet"))).column("group_id").to_pylist() == ["g1"] * 4
    assert writer.stats()["episodes_written"] == 4 and writer.stats()["episode_write_error"] == error


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_groups_per_file must be >= 1, got 0"):
        EpisodeWriter(tmp_path, max_groups_per_file=0)
