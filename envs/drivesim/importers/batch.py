"""Import many source files into one scene set: in parallel, resumably, reporting every file.

Workers (processes) read and convert one file each and write the scene atomically into
``<out>/.staging/``; the parent alone names scene files, moves them into ``scenes/`` (an atomic
rename) and rewrites ``index.json``, so scene-id collisions are decided in one place and an
interrupted import leaves a consistent set: every indexed scene is complete, and a rerun skips the
sources already in the index and unchanged since (entries record ``source``, ``source_bytes`` and
``source_mtime_ns``).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from envs.drivesim.importers import find_sources, import_file
from envs.drivesim.importers.common import ImportOptions
from envs.drivesim.importers.report import FIXED, IMPORTED, PRESENT, SKIPPED, FileReport
from envs.drivesim.scene import SceneError, SceneSet, index_entry, scene_file_name

STAGING = ".staging"
INDEX_FLUSH_S = 2.0
"""The index is rewritten at most this often while importing (and always at the end)."""


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _source_key(path: Path) -> str:
    return str(path.resolve())


def convert_one(fmt: str, path: str, options: ImportOptions, staging: str,
                check: bool = False) -> tuple[FileReport, str | None, dict | None]:
    """Worker: import one file and save it under ``staging``; with ``check``, add the logged ego's
    off-road rate and box overlaps (:mod:`.qa`) to the report's info.

    Returns ``(report, staged file or None, index entry or None)``; never raises for a bad file."""
    src = Path(path)
    try:
        result = import_file(fmt, src, options)
    except SceneError as e:
        return FileReport(path, SKIPPED, notes=(str(e),)), None, None
    except (OSError, MemoryError, RecursionError) as e:
        why = f"{path}: cannot read ({type(e).__name__}: {e})"
        return FileReport(path, SKIPPED, notes=(why,)), None, None
    except Exception as e:  # noqa: BLE001 - one bad file must never stop an import of thousands
        where = traceback.extract_tb(e.__traceback__)[-1]
        why = f"{path}: unexpected {type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"
        return FileReport(path, SKIPPED, notes=(why,)), None, None
    scene, notes = result.scene, result.notes
    staged = Path(staging) / f"{uuid.uuid4().hex}-{scene_file_name(scene.scene_id)}.npz"
    scene.save(staged)
    entry = index_entry(scene, "")
    entry["source"] = _source_key(src)
    stat = src.stat()
    entry["source_bytes"], entry["source_mtime_ns"] = stat.st_size, stat.st_mtime_ns
    if check:
        from envs.drivesim.importers.qa import check_scene

        qa = check_scene(scene)
        entry["qa_offroad_fraction"] = round(qa.offroad_fraction, 4)
        entry["qa_overlap_steps"] = qa.overlap_steps
        notes.info.append(f"check: logged ego off-road on {qa.offroad_steps}/{qa.valid_steps} steps, "
                          f"overlapping other agents on {qa.overlap_steps}"
                          + (f" (first at step {qa.first_overlap_step}: {', '.join(qa.overlap_agents[:3])})"
                             if qa.overlap_steps else ""))
    status = FIXED if notes.fixes else IMPORTED
    report = FileReport(path, status, scene.scene_id, tuple(notes.fixes), tuple(notes.info))
    return report, str(staged), entry


def import_scene_set(
    fmt: str,
    sources: Sequence[str | Path],
    out: str | Path,
    options: ImportOptions | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_report: Callable[[FileReport], None] | None = None,
    check: bool = False,
) -> list[FileReport]:
    """Import ``sources`` (files or directories) of format ``fmt`` into the scene set ``out``.

    ``workers`` processes convert files (default :func:`default_workers`; 1 = in this process).
    Sources already imported into ``out`` are reported ``present`` and skipped unless
    ``overwrite``. ``on_start(n_files)`` and ``on_report(report)`` drive a progress display;
    ``check`` runs the quality checks of :mod:`.qa` on every scene (reported as info).
    Returns one report per source file (and per source that held no file).
    """
    options = options or ImportOptions()
    out = Path(out)
    files, problems = find_sources(fmt, list(sources))
    reports: list[FileReport] = [FileReport(src, SKIPPED, notes=(f"{src}: {why}",)) for src, why in problems]
    entries: list[dict] = SceneSet.open(out).entries if (out / "index.json").is_file() else []
    by_source = {e.get("source"): e for e in entries if e.get("source")}
    todo: list[Path] = []
    for f in files:
        e = by_source.get(_source_key(f))
        stat = f.stat()
        if e is not None and not overwrite and (e.get("source_bytes"), e.get("source_mtime_ns")) == (
                stat.st_size, stat.st_mtime_ns) and (out / e["file"]).is_file():
            reports.append(FileReport(str(f), PRESENT, e["scene_id"]))
        else:
            todo.append(f)
    if on_start:
        on_start(len(reports) + len(todo))
    for r in reports:
        if on_report:
            on_report(r)
    if not todo:
        return reports

    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
    staging.mkdir(parents=True)
    (out / "scenes").mkdir(exist_ok=True)
    by_id = {e["scene_id"]: i for i, e in enumerate(entries)}
    file_owner = {e["file"]: e["scene_id"] for e in entries}
    last_flush = time.monotonic()
    dirty = False

    def accept(report: FileReport, staged: str | None, entry: dict | None) -> FileReport:
        nonlocal dirty
        if staged is None or entry is None:
            return report
        sid = entry["scene_id"]
        file = f"scenes/{scene_file_name(sid)}.npz"
        old = entries[by_id[sid]] if sid in by_id else None
        clash = None
        if old is not None and old.get("source") != entry["source"]:
            clash = f"scene id {sid!r} is already in {out} (imported from {old.get('source', 'elsewhere')})"
        elif file_owner.get(file, sid) != sid:
            clash = (f"scene file {file} already holds scene {file_owner[file]!r} (ids differ only in "
                     "characters that file names cannot hold)")
        if clash:
            Path(staged).unlink(missing_ok=True)
            return FileReport(report.source, SKIPPED, sid, (f"{report.source}: {clash}; not overwritten",))
        os.replace(staged, out / file)
        entry["file"] = file
        if old is not None:
            entries[by_id[sid]] = entry
        else:
            by_id[sid] = len(entries)
            entries.append(entry)
        file_owner[file] = sid
        dirty = True
        return report

    def finish(result: tuple[FileReport, str | None, dict | None]) -> None:
        nonlocal last_flush, dirty
        report = accept(*result)
        reports.append(report)
        if on_report:
            on_report(report)
        if dirty and time.monotonic() - last_flush > INDEX_FLUSH_S:
            SceneSet.write_index(out, entries)
            last_flush, dirty = time.monotonic(), False

    n_workers = workers or default_workers()
    try:
        if n_workers <= 1 or len(todo) == 1:
            for f in todo:
                finish(convert_one(fmt, str(f), options, str(staging), check))
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork: the parent may run threads (progress bar)
            with ProcessPoolExecutor(max_workers=min(n_workers, len(todo)), mp_context=ctx) as pool:
                source_of = {pool.submit(convert_one, fmt, str(f), options, str(staging), check): str(f)
                             for f in todo}
                pending: set[Future] = set(source_of)
                try:
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            try:
                                result = fut.result()
                            except BrokenProcessPool as e:  # a worker died (e.g. out of memory)
                                src = source_of[fut]
                                why = f"{src}: the worker process died ({e}); rerun to retry"
                                result = (FileReport(src, SKIPPED, notes=(why,)), None, None)
                            finish(result)
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    finally:
        if dirty:
            SceneSet.write_index(out, entries)
        shutil.rmtree(staging, ignore_errors=True)
    return reports
