"""Rewards as YAML term lists (DESIGN.md, "Rewards").

``RewardFn.from_file("progress_safety", env_metric_aggregations)`` reads and validates a preset (or a
path to a YAML file) against the env's declared metrics; ``reward_fn.episode(series)`` gives the
return and ``{term: value}``; ``reward_fn.per_decision(series, decision_of_tick, num_decisions)`` the
per-decision ``reward`` column, which sums to the return. ``reward_fn`` is the ``_target_`` of a reward
config node (the presets carry it), so the runtime builds a reward from config alone.

This package imports ``alpagym_ray`` only (never ``envs`` or ``learners``).
"""

from rewards.compute import RewardFn, RewardResult, reward_fn
from rewards.spec import RewardSpec, RewardSpecError, TermSpec, load_spec, parse_spec, preset_names

__all__ = ["RewardFn", "RewardResult", "RewardSpec", "RewardSpecError", "TermSpec", "load_spec",
           "parse_spec", "preset_names", "reward_fn"]
