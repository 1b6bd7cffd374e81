"""Turn one episode's per-tick metric series into its return, its per-term values and its
per-decision ``reward`` column (DESIGN.md, "Rewards").

The return is the sum of the term contributions ``scale * clip(value)``. The per-decision rewards
hold the dense terms of the ticks each decision covered plus every episodic term on the last
decision, so an episode's rows sum to its return (up to float rounding).

Series come as ``{name: (values [T] float, valid [T] bool, Aggregation)}``: what drivesim returns
per episode and what ``alpagym_ray.metrics.series_to_arrays`` makes of AlpaSim's
``TimestepMetric`` list; the same series give the same reward whichever simulator produced them.

:func:`reward_fn` is the ``_target_`` of the reward presets (``alpagym_ray/conf/reward/*.yaml``): the
rollout workers build the reward from its config node without knowing this package
(``instantiate(reward, metric_aggregations=env.metric_aggregations)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alpagym_ray.metrics import DERIVED_EPISODE_METRICS, Aggregation, episode_metrics, tick_mask
from rewards import terms as term_math
from rewards.spec import (
    DERIVED_NEEDS,
    MASK_SERIES,
    BoundTerm,
    RewardSpec,
    bind_terms,
    load_spec,
    parse_spec,
)

Series = Mapping[str, tuple[np.ndarray, np.ndarray, Aggregation]]


def _names(metric_aggregations: Mapping[str, Aggregation | str]) -> list[str]:
    """Metric names for messages: the env's series and the derived episode metrics."""
    return sorted(set(metric_aggregations) | set(DERIVED_EPISODE_METRICS))


@dataclass(frozen=True)
class RewardResult:
    """One episode's reward."""

    total: float
    """The return: the sum of ``terms``."""
    terms: dict[str, float]
    """``{term name: scale * clip(value)}``, the contribution of each term to the return."""
    raw: dict[str, float]
    """``{term name: value}`` before clip and scale."""
    per_decision: np.ndarray | None
    """``[num_decisions]`` float64 rewards summing to ``total``, when decisions were given."""


class RewardFn:
    """A reward spec checked against one env's metrics, ready to score its episodes.

    Build it before any rollout (``from_file`` validates everything), then call :meth:`episode`,
    :meth:`per_decision` or :meth:`evaluate` (both at once) on each finished episode's series.
    """

    def __init__(self, spec: RewardSpec, metric_aggregations: Mapping[str, Aggregation | str]) -> None:
        self.spec = spec
        self.terms: tuple[BoundTerm, ...] = bind_terms(spec, metric_aggregations)
        needed = list(MASK_SERIES)
        for term in self.terms:
            if term.derived:
                needed += DERIVED_NEEDS
            elif term.spec.metric_name is not None:
                needed.append(term.spec.metric_name)
            elif (hook := getattr(term.fn, "required_series", None)) is not None:
                needed += hook(dict(term.spec.params))
        self.required_series: tuple[str, ...] = tuple(dict.fromkeys(needed))
        """Series every episode must carry (python targets without ``required_series`` may read more)."""

    @classmethod
    def from_file(cls, name_or_path: str | Path,
                  metric_aggregations: Mapping[str, Aggregation | str]) -> RewardFn:
        """A preset name (``alpagym_ray/conf/reward/<name>.yaml``) or a path to a YAML file, checked
        against the env's ``{metric name: its own aggregation}``."""
        return cls(load_spec(name_or_path, _names(metric_aggregations)), metric_aggregations)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], metric_aggregations: Mapping[str, Aggregation | str],
                     source: str = "reward config") -> RewardFn:
        """From an already-parsed mapping with a ``terms:`` list, e.g. the Hydra node ``cfg.reward``;
        ``source`` names it in error messages."""
        return cls(parse_spec(raw, source, _names(metric_aggregations)), metric_aggregations)

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @property
    def has_dense(self) -> bool:
        """Whether some term is dense (else every reward lands on the last decision)."""
        return any(t.spec.dense for t in self.terms)

    # -----------------------------------------------------------------------------------------------

    def check_series(self, series: Series) -> int:
        """Check shapes and required names; return ``T``. Raises ValueError naming the series."""
        src = self.spec.source
        missing = [n for n in self.required_series if n not in series]
        if missing:
            raise ValueError(f"{src}: the episode lacks the series {missing}; it has {sorted(series)}")
        lengths = {}
        for name, entry in series.items():
            if not isinstance(entry, tuple | list) or len(entry) != 3:
                raise ValueError(f"{src}: series {name!r} must be (values, valid, aggregation)")
            values, valid = np.asarray(entry[0]), np.asarray(entry[1])
            if values.ndim != 1 or values.shape != valid.shape:
                raise ValueError(f"{src}: series {name!r}: values {values.shape} and valid {valid.shape} "
                                 f"must be equal 1-D shapes")
            lengths[name] = values.shape[0]
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{src}: series of different lengths {lengths}; align them first "
                             f"(alpagym_ray.metrics.series_to_arrays)")
        return next(iter(lengths.values()))

    def mask(self, series: Series) -> np.ndarray:
        """The shared tick mask ``[T]`` bool, as ``alpagym_ray.metrics.episode_metrics`` builds it."""
        flags = {k: np.where(np.asarray(series[k][1], bool), np.asarray(series[k][0], np.float64), 0.0)
                 for k in MASK_SERIES}
        return tick_mask(flags["eval_relevant"], flags["collision_any"], flags["offroad"],
                         self.spec.cut_after_failure)

    def evaluate(self, series: Series, decision_of_tick: np.ndarray | None = None,
                 num_decisions: int | None = None) -> RewardResult:
        """Score one episode; with ``decision_of_tick [T]`` (each tick's decision index, -1 for warm-up
        ticks) and ``num_decisions`` also its per-decision rewards.

        A counted tick mapped to -1 (the env says warm-up, the series say policy in control) adds its
        dense reward to decision 0, so that the rows still sum to the return."""
        num_ticks = self.check_series(series)
        dec = None
        if decision_of_tick is not None or num_decisions is not None:
            dec = self._check_decisions(decision_of_tick, num_decisions, num_ticks)
        mask = self.mask(series)
        derived: dict[str, np.ndarray] | None = None
        contrib: dict[str, float] = {}
        raw: dict[str, float] = {}
        dense = np.zeros(num_ticks, dtype=np.float64)
        for i, term in enumerate(self.terms, start=1):
            spec = term.spec
            if term.derived:
                if derived is None:
                    derived = episode_metrics(series, self.spec.cut_after_failure)
                value = float(np.nan_to_num(derived[str(spec.metric_name)], nan=0.0))
            elif spec.kind == "python":
                assert term.fn is not None
                out = term.fn(series, mask, dict(spec.params))
                if not isinstance(out, int | float | np.number) or isinstance(out, bool):
                    raise ValueError(f"{self.spec.source}, term {i} ({term.name}): {spec.target} returned "
                                     f"{type(out).__name__}, expected a float")
                value = float(out)
            else:
                assert spec.metric_name is not None
                v, valid, _ = series[spec.metric_name]
                v = np.asarray(v, dtype=np.float64)
                keep = mask & np.asarray(valid, dtype=bool)
                if spec.kind == "metric":
                    assert term.reduction is not None
                    value = term_math.reduce(v, keep, term.reduction)
                    if spec.dense:
                        dense += spec.scale * term_math.densify(v, keep, term.reduction)
                elif spec.kind == "distance_to_gt":
                    value = term_math.rms(v, keep)
                else:
                    value = term_math.threshold(v, keep, spec.above, spec.below, spec.mode)
                    if spec.dense:
                        dense += spec.scale * term_math.threshold_dense(v, keep, spec.above, spec.below,
                                                                        spec.mode)
            raw[term.name] = value
            if spec.clip is not None:
                value = min(max(value, spec.clip[0]), spec.clip[1])
            if not math.isfinite(value):
                what = spec.target if spec.kind == "python" else repr(spec.metric_name)
                raise ValueError(f"{self.spec.source}, term {i} ({term.name}): value {value} from {what} is "
                                 f"not finite; bound it with clip: [low, high] or check the metric")
            contrib[term.name] = spec.scale * value
        total = float(sum(contrib.values()))
        per_decision = None
        if dec is not None:
            assert num_decisions is not None
            per_decision = np.zeros(num_decisions, dtype=np.float64)
            np.add.at(per_decision, np.maximum(dec, 0), dense)
            dense_terms = sum(contrib[t.name] for t in self.terms if t.spec.dense)
            # episodic terms land on the last decision
            per_decision[-1] += total - dense_terms
        return RewardResult(total=total, terms=contrib, raw=raw, per_decision=per_decision)

    def episode(self, series: Series) -> tuple[float, dict[str, float]]:
        """``(return, {term name: contribution})`` of one episode."""
        result = self.evaluate(series)
        return result.total, result.terms

    def per_decision(self, series: Series, decision_of_tick: np.ndarray, num_decisions: int) -> np.ndarray:
        """``[num_decisions]`` float64 rewards of one episode; they sum to its return."""
        result = self.evaluate(series, decision_of_tick, num_decisions)
        assert result.per_decision is not None
        return result.per_decision

    def _check_decisions(self, decision_of_tick: np.ndarray | None, num_decisions: int | None,
                         num_ticks: int) -> np.ndarray:
        src = self.spec.source
        if decision_of_tick is None or num_decisions is None:
            raise ValueError(f"{src}: per-decision rewards need both decision_of_tick and num_decisions")
        if isinstance(num_decisions, bool) or not isinstance(num_decisions, int | np.integer) \
                or num_decisions < 1:
            raise ValueError(f"{src}: num_decisions must be an int >= 1, got {num_decisions!r}")
        dec = np.asarray(decision_of_tick)
        if dec.shape != (num_ticks,) or not np.issubdtype(dec.dtype, np.integer):
            raise ValueError(f"{src}: decision_of_tick must be an int array of shape ({num_ticks},) like "
                             f"the series, got {dec.dtype} {dec.shape}")
        if dec.size and (dec.min() < -1 or dec.max() >= num_decisions):
            raise ValueError(f"{src}: decision_of_tick holds values in [{dec.min()}, {dec.max()}]; "
                             f"valid: -1 (warm-up) to num_decisions - 1 = {num_decisions - 1}")
        return dec


def reward_fn(metric_aggregations: Mapping[str, Aggregation | str], source: str = "reward config",
              **spec_fields: Any) -> RewardFn:
    """The ``_target_`` of a reward config node: ``spec_fields`` are the reward file's keys (``terms``,
    ``cut_after_failure``, ``description``), checked against the env's ``{metric name: aggregation}``.

    ``source`` names the reward in every error (e.g. ``reward 'progress_safety'
    (alpagym_ray/conf/reward/progress_safety.yaml)``); a :class:`~rewards.spec.RewardSpecError` says
    what is wrong with which term."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"reward_fn: source must be a non-empty string naming the reward, got {source!r}")
    return RewardFn.from_mapping(spec_fields, metric_aggregations, source=source)
