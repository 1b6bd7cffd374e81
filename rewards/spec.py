"""Reward specs: the YAML term list, read and validated (DESIGN.md, "Rewards").

A reward file (a preset in ``alpagym_ray/conf/reward/<name>.yaml`` or a user's own YAML) holds::

    cut_after_failure: true          # optional: the shared tick mask drops ticks after a failure
    terms:
      - {kind: metric, metric_name: progress, scale: 1.0}
      - {kind: threshold, metric_name: ttc_s, below: 1.5, mode: fraction, scale: -1.0}
      - {kind: python, target: rewards.carl:carl_reward, params: {comfort: 0.5}}

Validation happens in two steps, both before any rollout:

1. :func:`parse_spec` checks the file on its own (kinds, keys, types, cross-field rules) into a
   :class:`RewardSpec` of frozen :class:`TermSpec`;
2. :func:`bind_terms` checks it against the metric names the chosen env declares, resolves every
   term's aggregation and imports ``python`` targets, into :class:`BoundTerm`.

Every error is a :class:`RewardSpecError` naming the reward (preset or file), the term (1-based, as a
person counts the YAML list), what is wrong and the valid choices, with a did-you-mean.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpagym_ray.metrics import DERIVED_EPISODE_METRICS, Aggregation

KINDS = ("metric", "distance_to_gt", "threshold", "python")
"""Term kinds."""
REDUCTIONS = ("last", "max", "min", "mean", "sum", "median")
"""Values of a term's ``aggregation``: AlpaSim's time aggregations plus ``sum``."""
DENSE_REDUCTIONS = ("last", "max", "min", "mean", "sum")
"""Aggregations with a dense (per-tick) form; see :mod:`rewards.terms`."""
MODES = ("count", "fraction")
"""Values of a threshold term's ``mode``."""

COMMON_KEYS = ("kind", "name", "scale", "clip", "dense")
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "metric": ("metric_name", "aggregation"),
    "distance_to_gt": ("metric_name",),
    "threshold": ("metric_name", "above", "below", "mode"),
    "python": ("target", "params"),
}
"""Keys each kind accepts besides :data:`COMMON_KEYS`."""
ALL_TERM_KEYS = tuple(dict.fromkeys(COMMON_KEYS + sum(KIND_KEYS.values(), ())))
TOP_LEVEL_KEYS = ("terms", "cut_after_failure", "description", "defaults", "_target_")
"""Keys of a reward file; ``defaults`` (Hydra's defaults list) and ``_target_`` (the factory that
builds the reward from this node, :func:`rewards.compute.reward_fn`) are ignored here."""

DISTANCE_TO_GT_METRIC = "dist_to_gt_location"
"""The series a ``distance_to_gt`` term takes the RMS of, unless ``metric_name`` says otherwise."""
MASK_SERIES = ("eval_relevant", "collision_any", "offroad")
"""Series the shared tick mask is built from (``alpagym_ray.metrics.tick_mask``)."""
DERIVED_NEEDS = ("collision_front", "collision_lateral", "collision_any", "offroad", "progress",
                 "gt_dist_traveled_m")
"""Series ``alpagym_ray.metrics.episode_metrics`` needs to derive the episode-only metrics."""
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_AGGREGATION_TO_REDUCTION = {
    Aggregation.UNSPECIFIED: "mean",  # AlpaSim reduces unspecified series by the mean
    Aggregation.MEAN: "mean",
    Aggregation.MEDIAN: "median",
    Aggregation.MAX: "max",
    Aggregation.MIN: "min",
    Aggregation.LAST: "last",
}


class RewardSpecError(ValueError):
    """A reward spec that cannot be used: the message names the reward, the term and the fix."""


def did_you_mean(word: object, choices: Collection[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_choice(what: str, word: object, choices: Collection[str], where: str = "") -> str:
    """``"unknown <what> 'w'<where>; did you mean 'x'? valid: [...]"`` (no hint when none is close)."""
    hint = did_you_mean(word, choices)
    return f"unknown {what} {word!r}{where}{hint}{' ' if hint else '; '}valid: {sorted(choices)}"


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _yaml_hint(value: object) -> str:
    """A hint when YAML read a number as text: PyYAML takes ``1e-3`` (no dot) for a string."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML read it as text: write exponents with a dot, e.g. 1.0e-3)"
    return ""


def _plain(x: Any) -> Any:
    """Plain Python containers from YAML / OmegaConf ones (so params are ordinary dicts and lists)."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str | bytes):
        return [_plain(v) for v in x]
    return x


@dataclass(frozen=True)
class TermSpec:
    """One reward term as written in the YAML file (independent of any env)."""

    kind: str
    """``metric`` | ``distance_to_gt`` | ``threshold`` | ``python``."""
    scale: float = 1.0
    """Multiplies the (clipped) term value; the product is the term's contribution to the return."""
    name: str | None = None
    """Name for logging and the per-episode columns; default ``term_<i>_<kind>_<metric or function>``."""
    metric_name: str | None = None
    """The metric the term reads (metric, threshold; distance_to_gt: default ``dist_to_gt_location``)."""
    aggregation: str | None = None
    """metric: ``last|max|min|mean|sum|median`` over the counted ticks; default the metric's own."""
    above: float | None = None
    """threshold: a tick counts when the value is strictly above this."""
    below: float | None = None
    """threshold: a tick counts when the value is strictly below this."""
    mode: str = "fraction"
    """threshold: ``count`` of ticks or ``fraction`` of the counted ticks."""
    target: str | None = None
    """python: ``module:function`` called as ``function(series, mask, params) -> float``."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """python: keyword parameters handed to the target as one mapping."""
    clip: tuple[float, float] | None = None
    """``[low, high]`` applied to the raw term value, before ``scale``."""
    dense: bool = False
    """Spread the term over the decisions that earned it (drivesim only; see rewards.terms)."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(unknown_choice("kind", self.kind, KINDS))
        allowed = set(COMMON_KEYS) | set(KIND_KEYS[self.kind])
        defaults: dict[str, Any] = {"metric_name": None, "aggregation": None, "above": None, "below": None,
                                    "mode": "fraction", "target": None, "params": {}}
        for key, default in defaults.items():
            if key not in allowed and getattr(self, key) != default:
                raise ValueError(f"key {key!r} does not apply to kind {self.kind!r} "
                                 f"(keys for {self.kind}: {sorted(allowed)})")
        if not _is_number(self.scale) or not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}{_yaml_hint(self.scale)}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.name is not None and (not isinstance(self.name, str) or not _NAME_RE.match(self.name)):
            raise ValueError(f"name must be a word of letters, digits, '_', '.' or '-' starting with a "
                             f"letter or '_', got {self.name!r}")
        if not isinstance(self.dense, bool):
            raise ValueError(f"dense must be true or false, got {self.dense!r}")
        if self.clip is not None:
            clip = self.clip
            if (isinstance(clip, str) or not isinstance(clip, Sequence) or len(clip) != 2
                    or not all(_is_number(c) for c in clip)):
                raise ValueError(f"clip must be a list [low, high] of two numbers, got {clip!r}")
            low, high = float(clip[0]), float(clip[1])
            if math.isnan(low) or math.isnan(high) or low > high:
                raise ValueError(f"clip [low, high] needs low <= high, got {list(clip)}")
            object.__setattr__(self, "clip", (low, high))
        if self.kind == "distance_to_gt" and self.metric_name is None:
            object.__setattr__(self, "metric_name", DISTANCE_TO_GT_METRIC)
        if self.kind in ("metric", "threshold", "distance_to_gt"):
            if self.metric_name is None:
                raise ValueError(f"missing field 'metric_name' (kind {self.kind!r} needs it)")
            if not isinstance(self.metric_name, str):
                raise ValueError(f"metric_name must be a string, got {self.metric_name!r}")
        if self.aggregation is not None and (not isinstance(self.aggregation, str)
                                             or self.aggregation not in REDUCTIONS):
            raise ValueError(unknown_choice("aggregation", self.aggregation, REDUCTIONS))
        if self.kind == "threshold":
            if self.above is None and self.below is None:
                raise ValueError("a threshold term needs 'above', 'below' or both")
            for key in ("above", "below"):
                value = getattr(self, key)
                if value is not None:
                    if not _is_number(value) or math.isnan(value):
                        raise ValueError(f"{key} must be a number, got {value!r}{_yaml_hint(value)}")
                    object.__setattr__(self, key, float(value))
            if self.above is not None and self.below is not None and not self.below < self.above:
                raise ValueError(f"with both bounds a tick counts outside [below, above], so below must "
                                 f"be < above; got below={self.below}, above={self.above}")
            if not isinstance(self.mode, str) or self.mode not in MODES:
                raise ValueError(unknown_choice("mode", self.mode, MODES))
        if self.kind == "python":
            if self.target is None:
                raise ValueError("missing field 'target' (kind 'python' needs 'module:function')")
            if not isinstance(self.target, str) or self.target.count(":") != 1 or not all(
                    p.strip() for p in self.target.split(":")):
                raise ValueError(f"target must be 'module:function', got {self.target!r}")
            if not isinstance(self.params, Mapping) or not all(isinstance(k, str) for k in self.params):
                raise ValueError(f"params must be a mapping of names to values, got {self.params!r}")
            object.__setattr__(self, "params", _plain(self.params))
        if self.dense:
            if self.clip is not None:
                raise ValueError("dense: true cannot be combined with clip: clip bounds the episodic "
                                 "value, which a dense term spreads over its ticks")
            if self.kind == "python":
                raise ValueError("python terms have no dense form (they return one episodic value)")
            if self.kind == "distance_to_gt":
                raise ValueError("distance_to_gt (an RMS) has no dense form; for a dense distance use "
                                 "{kind: metric, metric_name: dist_to_gt_location, aggregation: mean, "
                                 "dense: true}")

    def label(self, index: int) -> str:
        """The term's logging name; ``index`` is 1-based."""
        if self.name is not None:
            return self.name
        what = str(self.target).split(":")[1].split(".")[-1] if self.kind == "python" else self.metric_name
        return f"term_{index}_{self.kind}_{what}"


@dataclass(frozen=True)
class RewardSpec:
    """A whole reward: its terms and the tick-mask setting."""

    terms: tuple[TermSpec, ...]
    """The terms, in file order; the return is the sum of their contributions."""
    cut_after_failure: bool = True
    """The shared tick mask drops ticks after the first collision_any / offroad (AlpaSim's rule)."""
    source: str = "reward"
    """How errors name this reward, e.g. ``reward 'carl' (alpagym_ray/conf/reward/carl.yaml)``."""
    description: str = ""
    """Free text from the file."""

    def __post_init__(self) -> None:
        if not self.terms:
            raise RewardSpecError(f"{self.source}: 'terms' is empty; a reward needs at least one term")
        if not isinstance(self.cut_after_failure, bool):
            raise RewardSpecError(f"{self.source}: cut_after_failure must be true or false, "
                                  f"got {self.cut_after_failure!r}")
        seen: dict[str, int] = {}
        for i, term in enumerate(self.terms, start=1):
            label = term.label(i)
            if label in seen:
                raise RewardSpecError(f"{self.source}, term {i}: name {label!r} is already used by term "
                                      f"{seen[label]}; term names must be unique")
            seen[label] = i

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(t.label(i) for i, t in enumerate(self.terms, start=1))


# ---------------------------------------------------------------------------------------------------
# Reading files


def preset_dir() -> Path:
    """``alpagym_ray/conf/reward``: the presets (and the Hydra config group ``reward``)."""
    import alpagym_ray

    return Path(alpagym_ray.__file__).resolve().parent / "conf" / "reward"


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_source(name_or_path: str | Path) -> tuple[Path, str]:
    """``(file, label)`` for a preset name or a path to a YAML file.

    A word without a path separator or YAML suffix is a preset name."""
    text = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(
        (".yaml", ".yml"))
    if is_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise RewardSpecError(f"reward file '{text}' not found")
        return path, f"reward file '{text}'"
    path = preset_dir() / f"{text}.yaml"
    if not path.is_file():
        names = preset_names()
        raise RewardSpecError(f"{unknown_choice('reward preset', text, names)} "
                              f"(or give a path to a YAML file)")
    try:
        shown = path.relative_to(preset_dir().parents[2])  # repository-relative when not installed
    except ValueError:
        shown = path
    return path, f"reward '{text}' ({shown.as_posix()})"


def load_spec(name_or_path: str | Path, metric_names: Collection[str] | None = None) -> RewardSpec:
    """Read and check (env-independently) a preset or a YAML file; ``metric_names``, when given,
    only enrich messages (a missing ``metric_name`` lists them)."""
    import yaml

    path, label = resolve_source(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RewardSpecError(f"{label}: not valid YAML: {e}") from None
    return parse_spec(raw, label, metric_names)


def parse_spec(
    raw: object, source: str = "reward", metric_names: Collection[str] | None = None
) -> RewardSpec:
    """Check a parsed reward file (a mapping with a ``terms:`` list; Hydra nodes work, their
    ``_target_`` is ignored) into a spec; ``metric_names`` as in :func:`load_spec`."""
    if raw is None:
        raise RewardSpecError(f"{source}: empty; expected a mapping with a 'terms:' list")
    if not isinstance(raw, Mapping):
        raise RewardSpecError(f"{source}: expected a mapping with a 'terms:' list, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise RewardSpecError(f"{source}: {unknown_choice('top-level key', key, TOP_LEVEL_KEYS)}")
    if "terms" not in raw:
        raise RewardSpecError(f"{source}: missing field 'terms' (a list of terms)")
    terms_raw = raw["terms"]
    if isinstance(terms_raw, str | bytes | Mapping) or not isinstance(terms_raw, Sequence):
        raise RewardSpecError(f"{source}: 'terms' must be a list, got {type(terms_raw).__name__}")
    terms = tuple(_parse_term(t, i, source, metric_names) for i, t in enumerate(terms_raw, start=1))
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RewardSpecError(f"{source}: description must be text, got {description!r}")
    return RewardSpec(terms=terms, cut_after_failure=raw.get("cut_after_failure", True), source=source,
                      description=description)


def _parse_term(raw: object, index: int, source: str, metric_names: Collection[str] | None) -> TermSpec:
    where = f"{source}, term {index}"
    if not isinstance(raw, Mapping):
        raise RewardSpecError(f"{where}: expected a mapping like {{kind: metric, metric_name: progress}}, "
                              f"got {raw!r}")
    if "kind" not in raw:
        raise RewardSpecError(f"{where}: missing field 'kind'; valid kinds: {list(KINDS)}")
    kind = raw["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise RewardSpecError(f"{where}: {unknown_choice('kind', kind, KINDS)}")
    allowed = COMMON_KEYS + KIND_KEYS[kind]
    for key in raw:
        if key in allowed:
            continue
        if key in ALL_TERM_KEYS:
            raise RewardSpecError(f"{where}: key {key!r} does not apply to kind {kind!r}; "
                                  f"keys for {kind}: {sorted(allowed)}")
        raise RewardSpecError(f"{where}: " + unknown_choice("key", key, allowed, f" for kind {kind!r}"))
    if kind in ("metric", "threshold") and "metric_name" not in raw:
        valid = f"; valid: {sorted(metric_names)}" if metric_names else ""
        raise RewardSpecError(f"{where}: missing field 'metric_name' (kind {kind!r} needs it){valid}")
    values = {str(k): _plain(v) for k, v in raw.items()}
    if isinstance(values.get("clip"), list):
        values["clip"] = tuple(values["clip"])
    if values.get("params", {}) is None:
        values["params"] = {}
    try:
        return TermSpec(**values)
    except ValueError as e:
        raise RewardSpecError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Checking against an env


PythonTarget = Callable[[Mapping[str, Any], Any, Mapping[str, Any]], float]


@dataclass(frozen=True)
class BoundTerm:
    """A term checked against an env's metric names, ready to evaluate."""

    spec: TermSpec
    """The term as written."""
    name: str
    """Its logging name."""
    reduction: str | None = None
    """metric terms: the resolved aggregation (one of :data:`REDUCTIONS`)."""
    derived: bool = False
    """metric terms: the metric is episode-only (``collision_at_fault``, ``offroad_or_collision``,
    ``scene_score``), taken from ``alpagym_ray.metrics.episode_metrics``."""
    fn: PythonTarget | None = None
    """python terms: the imported target."""


def import_target(target: str) -> Callable[..., Any]:
    """Import ``module:attr.path``; raise ValueError saying what failed."""
    module_name, attr_path = target.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # any failure while importing the user's module is a spec error here
        raise ValueError(f"target {target!r}: cannot import module {module_name!r}: "
                         f"{type(e).__name__}: {e}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ValueError(f"target {target!r}: {module_name!r} has no {part!r}"
                             f"{did_you_mean(part, public)}") from None
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"target {target!r} is a {type(obj).__name__}, not a function")
    try:
        inspect.signature(obj).bind(None, None, None)
    except TypeError:
        raise ValueError(f"target {target!r} must accept (series, mask, params); its signature is "
                         f"{obj.__name__}{inspect.signature(obj)}") from None
    except ValueError:  # no signature available (some builtins): trust it
        pass
    return obj


def bind_terms(
    spec: RewardSpec, metric_aggregations: Mapping[str, Aggregation | str]
) -> tuple[BoundTerm, ...]:
    """Check ``spec`` against the metrics an env declares (``{name: its own aggregation}``).

    Derived episode metrics are valid ``metric`` names when the env declares the series they are
    derived from. python targets are imported here and may carry two optional hooks (attributes of
    the function): ``validate_params(params, metric_names)``, called here, raises ValueError on bad
    params or missing metrics; ``required_series(params) -> list[str]`` names the series an episode
    must carry (``RewardFn.check_series`` checks them)."""
    declared: dict[str, Aggregation] = {}
    for name, agg in metric_aggregations.items():
        try:
            declared[name] = agg if isinstance(agg, Aggregation) else Aggregation.parse(str(agg))
        except ValueError as e:
            raise RewardSpecError(f"{spec.source}: the env declares metric {name!r} with {e}") from None
    per_tick = {n: a for n, a in declared.items() if n not in DERIVED_EPISODE_METRICS}
    missing_mask = [m for m in MASK_SERIES if m not in per_tick]
    if missing_mask:
        raise RewardSpecError(f"{spec.source}: the env declares no {missing_mask} series; the shared tick "
                              f"mask needs {list(MASK_SERIES)}")
    derived_ok = all(m in per_tick for m in DERIVED_NEEDS)
    episodic_names = sorted(per_tick) + (list(DERIVED_EPISODE_METRICS) if derived_ok else [])
    bound = []
    for i, term in enumerate(spec.terms, start=1):
        where = f"{spec.source}, term {i}"
        name = term.label(i)
        if term.kind == "python":
            assert term.target is not None  # TermSpec checked it
            try:
                fn = import_target(term.target)
                check = getattr(fn, "validate_params", None)
                if check is not None:
                    check(dict(term.params), frozenset(per_tick))
            except ValueError as e:
                raise RewardSpecError(f"{where}: {e}") from None
            bound.append(BoundTerm(term, name, fn=fn))
            continue
        metric = term.metric_name
        assert metric is not None
        if term.kind == "metric" and metric in DERIVED_EPISODE_METRICS:
            if not derived_ok:
                raise RewardSpecError(f"{where}: metric {metric!r} is derived from {list(DERIVED_NEEDS)}, "
                                      f"which this env does not all declare")
            if term.aggregation is not None:
                raise RewardSpecError(f"{where}: {metric!r} is one value per episode; remove "
                                      f"'aggregation: {term.aggregation}'")
            if term.dense:
                raise RewardSpecError(f"{where}: {metric!r} is one value per episode and has no dense "
                                      f"form; remove 'dense: true'")
            bound.append(BoundTerm(term, name, derived=True))
            continue
        if metric not in per_tick:
            if metric in DERIVED_EPISODE_METRICS:
                raise RewardSpecError(f"{where}: {metric!r} is one value per episode (no per-tick "
                                      f"series); kind {term.kind!r} needs a per-tick metric; valid: "
                                      f"{sorted(per_tick)}")
            choices = episodic_names if term.kind == "metric" else sorted(per_tick)
            raise RewardSpecError(f"{where}: {unknown_choice('metric_name', metric, choices)}")
        reduction = None
        if term.kind == "metric":
            reduction = term.aggregation or _AGGREGATION_TO_REDUCTION[per_tick[metric]]
            if term.dense and reduction not in DENSE_REDUCTIONS:
                raise RewardSpecError(f"{where}: aggregation {reduction!r} of {metric!r} has no dense form; "
                                      f"dense works with {list(DENSE_REDUCTIONS)}")
        bound.append(BoundTerm(term, name, reduction=reduction))
    return tuple(bound)
