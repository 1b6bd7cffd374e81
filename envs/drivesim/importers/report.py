"""Per-file import reports: imported, fixed (what and why), skipped (why), already present."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMPORTED = "imported"
"""The file became a scene as it was."""
FIXED = "fixed"
"""The file became a scene after repairs; ``notes`` says what was changed and why."""
SKIPPED = "skipped"
"""No scene was written; ``notes`` says why."""
PRESENT = "present"
"""The source was imported by an earlier run into the same set (resumable import)."""
STATUSES = (IMPORTED, FIXED, SKIPPED, PRESENT)


@dataclass(frozen=True)
class FileReport:
    """What happened to one source file."""

    source: str
    """Path of the source file."""
    status: str
    """One of :data:`STATUSES`."""
    scene_id: str | None = None
    """Id of the scene written (None when skipped)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Fixes applied (status ``fixed``) or the reason for skipping (status ``skipped``)."""
    info: tuple[str, ...] = field(default_factory=tuple)
    """Conversions that are not repairs (e.g. "ego positions are rear-axle poses: shifted 1.385 m")."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"FileReport.status must be one of {STATUSES}, got {self.status!r}")
        if self.status == SKIPPED and not self.notes:
            raise ValueError(f"FileReport for {self.source}: a skipped file needs a reason in notes")

    @property
    def ok(self) -> bool:
        """True when the scene is in the set (imported, fixed or already present)."""
        return self.status != SKIPPED

    def line(self) -> str:
        """One human-readable line (plus indented notes)."""
        target = f" -> {self.scene_id}" if self.scene_id else ""
        head = f"{self.status:<8} {self.source}{target}"
        return "\n".join([head] + [f"         - {n}" for n in self.notes])

    def to_json(self) -> dict:
        d = asdict(self)
        d["notes"], d["info"] = list(self.notes), list(self.info)
        return d


def summarize(reports: Iterable[FileReport]) -> str:
    """One-paragraph summary: counts per status and the most common skip reasons."""
    reports = list(reports)
    counts = Counter(r.status for r in reports)
    parts = [f"{counts.get(s, 0)} {s}" for s in STATUSES]
    text = f"{len(reports)} file(s): " + ", ".join(parts)
    reasons = Counter(r.notes[0].split(":")[0][:80] for r in reports if r.status == SKIPPED)
    if reasons:
        text += "\nskip reasons: " + "; ".join(f"{n} x {why}" for why, n in reasons.most_common(5))
    return text


def write_report(path: str | os.PathLike, reports: Iterable[FileReport]) -> None:
    """Write the reports as JSON (``{"files": [...], "summary": {...}}``), atomically."""
    reports = list(reports)
    body = {
        "summary": dict(Counter(r.status for r in reports)),
        "files": [r.to_json() for r in reports],
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)
