"""From the pre-trained tiny policy, a short CPU run with a fixed seed raises the held-out return and
lowers the failure rate (slow: several minutes on 2 cores). The longer recipe is in BENCHMARKS.md."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_grpo_improves_held_out_return_and_failures(tmp_path, monkeypatch):
    from alpagym_ray.cli import main

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["train", f"run_dir={run}", "iterations=8", "seed=0"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["return"] > before["return"]
    assert after["offroad_or_collision"] < before["offroad_or_collision"]
    assert summary["buffer"]["accounting_ok"]
