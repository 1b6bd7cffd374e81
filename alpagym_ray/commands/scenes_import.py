"""``alpagym-ray scenes import``: dataset files -> a scene set.

    alpagym-ray scenes import --format scenarionet ~/data/nuscenes_sd/ --out scenes/nuscenes
    alpagym-ray scenes import --format womd-json a.json b.json --out scenes/womd --workers 2
    alpagym-ray scenes import --format nurec ~/nurec/*.usdz --out scenes/nurec --quaternion-order wxyz

Sources are files or directories; files are converted in parallel; rerunning skips sources already
in the set. Every file is reported (imported, fixed: what and why, skipped: why, present), with a
summary at the end and a JSON report in ``<out>/import_report.json``. The exit code is 1 when no
source ended up in the set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from envs.drivesim.importers import FORMATS
from envs.drivesim.importers.batch import default_workers, import_scene_set
from envs.drivesim.importers.common import ImportOptions
from envs.drivesim.importers.report import FIXED, SKIPPED, FileReport, summarize, write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alpagym-ray scenes import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="source format")
    p.add_argument("sources", nargs="+", metavar="SRC", help="source files or directories")
    p.add_argument("--out", required=True, type=Path, help="scene-set directory (created or extended)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="parallel worker processes (default min(4, cpus) = %(default)s; 1 = in process)")
    p.add_argument("--overwrite", action="store_true", help="re-import sources already in the set")
    p.add_argument("--report", type=Path, default=None, help="JSON report (default <out>/import_report.json)")
    p.add_argument("--map-margin", type=float, default=80.0,
                   help="keep map features within this many metres of the agents (default %(default)s)")
    p.add_argument("--no-crop", action="store_true", help="keep the whole map")
    p.add_argument("--min-steps", type=int, default=20, help="skip scenes shorter than this (0.1 s steps)")
    p.add_argument("--ego-position", choices=("auto", "center", "rear_axle"), default="auto",
                   help="what the source's ego positions are (auto: per dataset; nuScenes = rear axle)")
    p.add_argument("--ego-rear-axle-to-center", type=float, default=None,
                   help="rear axle to box centre (m) for the ego, overriding the dataset's value")
    p.add_argument("--quaternion-order", choices=("xyzw", "wxyz"), default="xyzw",
                   help="NuRec tracks_poses quaternion order after x, y, z")
    p.add_argument("--nurec-map", choices=("auto", "xodr", "parquet"), default="auto",
                   help="NuRec map source (parquet support is best-effort and unverified)")
    p.add_argument("--check", action="store_true",
                   help="report how often the logged ego is off-road or overlaps others (slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="also list files imported without fixes")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("alpagym-ray scenes import: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        options = ImportOptions(
            map_margin_m=None if args.no_crop else args.map_margin,
            min_steps=args.min_steps,
            ego_position=args.ego_position,
            ego_rear_axle_to_center=args.ego_rear_axle_to_center,
            quaternion_order=args.quaternion_order,
            nurec_map=args.nurec_map,
        )
    except ValueError as e:
        print(f"alpagym-ray scenes import: {e}", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, highlight=False)
    show_bar = not args.no_progress and console.is_terminal
    progress = Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=not show_bar, transient=True)
    task = progress.add_task("import", total=None)

    def on_start(n: int) -> None:
        progress.update(task, total=n)

    def on_report(r: FileReport) -> None:
        progress.advance(task)
        if r.status in (FIXED, SKIPPED) or args.verbose:
            progress.console.print(r.line(), markup=False, soft_wrap=True)
            if args.verbose:
                for note in r.info:
                    progress.console.print(f"         ({note})", markup=False, soft_wrap=True)

    try:
        with progress:
            reports = import_scene_set(args.format, args.sources, args.out, options, workers=args.workers,
                                       overwrite=args.overwrite, on_start=on_start, on_report=on_report,
                                       check=args.check)
    except KeyboardInterrupt:
        console.print("interrupted: the scenes imported so far are in the set; rerun to continue")
        return 130
    except (ValueError, OSError) as e:
        console.print(f"alpagym-ray scenes import: {e}", markup=False)
        return 2
    report_path = args.report or (args.out / "import_report.json")
    if args.out.is_dir():
        write_report(report_path, reports)
    print(summarize(reports))
    if args.out.is_dir():
        print(f"report: {report_path}")
    ok = sum(r.ok for r in reports)
    if ok == 0:
        print("nothing imported", file=sys.stderr)
        return 1
    return 0
