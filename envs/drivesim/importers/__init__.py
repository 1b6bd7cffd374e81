"""Importers from the formats the field already uses to the project's scene format.

=============  ==============================================  ======================
format         what                                            reader
=============  ==============================================  ======================
scenarionet    ScenarioNet ScenarioDescription pickles          :mod:`.scenarionet`
womd-json      Waymo Open Motion per-scene JSON (GPUDrive)      :mod:`.womd_json`
nurec          AlpaSim / NuRec ``.usdz`` scene archives         :mod:`.nurec`
=============  ==============================================  ======================

:func:`import_file` turns one file into an :class:`~.common.ImportedScene` (or raises
:class:`~envs.drivesim.scene.SceneError`); :func:`envs.drivesim.importers.batch.import_scene_set`
imports many files, in parallel and resumably, into a scene-set directory, reporting every file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from envs.drivesim.importers.common import ImportedScene, ImportOptions
from envs.drivesim.scene import SceneError

FORMATS: dict[str, str] = {"scenarionet": ".pkl", "womd-json": ".json", "nurec": ".usdz"}
"""Format name -> file suffix searched for in source directories."""


def reader(fmt: str) -> Callable[[Path, ImportOptions], ImportedScene]:
    """The reader function of a format (imported lazily: each pulls its own dependencies)."""
    if fmt == "scenarionet":
        from envs.drivesim.importers.scenarionet import read_scenarionet

        return read_scenarionet
    if fmt == "womd-json":
        from envs.drivesim.importers.womd_json import read_womd_json

        return read_womd_json
    if fmt == "nurec":
        from envs.drivesim.importers.nurec import read_nurec

        return read_nurec
    raise ValueError(f"unknown scene format {fmt!r}; valid: {sorted(FORMATS)}")


def import_file(fmt: str, path: str | Path, options: ImportOptions | None = None) -> ImportedScene:
    """Import one source file of format ``fmt``; raises SceneError naming the file when it cannot
    become a scene."""
    return reader(fmt)(Path(path), options or ImportOptions())


def find_sources(fmt: str, sources: list[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and directories into source files.

    Returns ``(files, problems)``; ``problems`` are ``(source, why)`` for sources that do not exist
    or hold no file of the format. ScenarioNet directories are listed through their index files
    (``dataset_mapping.pkl`` / ``dataset_summary.pkl``) when present.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown scene format {fmt!r}; valid: {sorted(FORMATS)}")
    suffix = FORMATS[fmt]
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for src in map(Path, sources):
        if src.is_file():
            files.append(src)
        elif src.is_dir():
            if fmt == "scenarionet":
                from envs.drivesim.importers.scenarionet import discover

                try:
                    found = discover(src)
                except SceneError as e:
                    problems.append((str(src), str(e)))
                    continue
            else:
                found = sorted(p for p in src.rglob(f"*{suffix}") if p.is_file())
            if not found:
                problems.append((str(src), f"no {suffix} files in this directory"))
            files.extend(found)
        else:
            problems.append((str(src), "no such file or directory"))
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems


__all__ = ["FORMATS", "ImportOptions", "ImportedScene", "find_sources", "import_file", "reader"]
