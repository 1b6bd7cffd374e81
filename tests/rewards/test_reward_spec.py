"""Reading and validating reward specs: malformed specs and their messages."""

from __future__ import annotations

import re
import textwrap

import pytest

from alpagym_ray.metrics import ALPASIM_METRICS, Aggregation
from envs.drivesim.metric_names import DRIVESIM_METRICS
from rewards import RewardFn, RewardSpecError, TermSpec, load_spec, parse_spec, preset_names
from rewards.spec import resolve_source


def write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(raw, metrics=DRIVESIM_METRICS, source="reward 'x'") -> str:
    with pytest.raises(RewardSpecError) as info:
        RewardFn.from_mapping(raw, metrics, source=source)
    return str(info.value)


def one(**term) -> dict:
    return {"terms": [term]}


def test_presets_are_listed_and_labelled():
    assert preset_names() == ["carl", "comfort", "distance_to_gt", "metrics", "progress_safety",
                              "scene_score"]
    _, label = resolve_source("progress_safety")
    assert label == "reward 'progress_safety' (alpagym_ray/conf/reward/progress_safety.yaml)"


def test_brief_example_message_for_a_misspelt_metric(tmp_path):
    path = write(tmp_path, """
        terms:
          - {kind: metric, metric_name: progress, scale: 1.0}
          - {kind: metric, metric_name: colision_any, scale: -10.0}
    """)
    with pytest.raises(RewardSpecError) as info:
        RewardFn.from_file(path, DRIVESIM_METRICS)
    msg = str(info.value)
    assert msg.startswith(f"reward file '{path}', term 2: unknown metric_name 'colision_any'; "
                          f"did you mean 'collision_any'? valid: [")
    # the valid list holds the env's series and the derived episode metrics
    assert "'scene_score'" in msg and "'ttc_s'" in msg
    assert isinstance(info.value, ValueError)


def test_preset_checked_against_an_env_that_lacks_its_metrics():
    with pytest.raises(RewardSpecError, match=re.escape(
            "reward 'comfort' (alpagym_ray/conf/reward/comfort.yaml), term 4: unknown metric_name "
            "'accel_lon_mps2'; valid: ['collision_any'")):
        RewardFn.from_file("comfort", ALPASIM_METRICS)


@pytest.mark.parametrize(("raw", "expected"), [
    (one(kind="metrc", metric_name="progress"),
     "term 1: unknown kind 'metrc'; did you mean 'metric'? valid: ['distance_to_gt', 'metric', 'python', "
     "'threshold']"),
    (one(metric_name="progress"), "term 1: missing field 'kind'; valid kinds: ['metric',"),
    (one(kind="metric"), "term 1: missing field 'metric_name' (kind 'metric' needs it); valid: ["),
    (one(kind="metric", metric_nme="progress"),
     "term 1: unknown key 'metric_nme' for kind 'metric'; did you mean 'metric_name'? valid: ["),
    (one(kind="metric", metric_name="progress", above=1.0),
     "term 1: key 'above' does not apply to kind 'metric'; keys for metric: ['aggregation', 'clip',"),
    (one(kind="metric", metric_name="progress", scale="big"),
     "term 1: scale must be a finite number, got 'big'"),
    (one(kind="metric", metric_name="progress", scale=True),
     "term 1: scale must be a finite number, got True"),
    (one(kind="metric", metric_name="progress", scale="1e-3"),
     "term 1: scale must be a finite number, got '1e-3' (YAML read it as text: write exponents with a dot"),
    (one(kind="metric", metric_name=3), "term 1: metric_name must be a string, got 3"),
    (one(kind="metric", metric_name="progress", aggregation="avg"),
     "term 1: unknown aggregation 'avg'; valid: ['last', 'max', 'mean', 'median', 'min', 'sum']"),
    (one(kind="metric", metric_name="progress", aggregation="maxx"),
     "term 1: unknown aggregation 'maxx'; did you mean 'max'?"),
    (one(kind="metric", metric_name="progress", clip=[1.0]),
     "term 1: clip must be a list [low, high] of two numbers, got (1.0,)"),
    (one(kind="metric", metric_name="progress", clip=[2.0, 1.0]),
     "term 1: clip [low, high] needs low <= high, got [2.0, 1.0]"),
    (one(kind="metric", metric_name="progress", dense="yes"), "term 1: dense must be true or false"),
    (one(kind="metric", metric_name="progress", name="my term"), "term 1: name must be a word"),
    (one(kind="threshold", metric_name="ttc_s"), "term 1: a threshold term needs 'above', 'below' or both"),
    (one(kind="threshold", metric_name="ttc_s", above=1.0, below=2.0),
     "term 1: with both bounds a tick counts outside [below, above], so below must be < above"),
    (one(kind="threshold", metric_name="ttc_s", below="low"), "term 1: below must be a number, got 'low'"),
    (one(kind="threshold", metric_name="ttc_s", below=1.0, mode="percent"),
     "term 1: unknown mode 'percent'; valid: ['count', 'fraction']"),
    (one(kind="python"), "term 1: missing field 'target' (kind 'python' needs 'module:function')"),
    (one(kind="python", target="rewards.carl.carl_reward"),
     "term 1: target must be 'module:function', got 'rewards.carl.carl_reward'"),
    (one(kind="python", target="rewards.carl:carl_reward", params=[1, 2]),
     "term 1: params must be a mapping"),
    (one(kind="python", target="rewards.carl:carl_reward", dense=True), "term 1: python terms have no dense"),
    (one(kind="distance_to_gt", dense=True),
     "term 1: distance_to_gt (an RMS) has no dense form; for a dense"),
    (one(kind="metric", metric_name="progress", dense=True, clip=[0, 1]),
     "term 1: dense: true cannot be combined with clip"),
])
def test_malformed_terms(raw, expected):
    msg = error_of(raw)
    assert msg.startswith("reward 'x', ") and expected in msg, msg


@pytest.mark.parametrize(("raw", "expected"), [
    (None, "reward 'x': empty; expected a mapping with a 'terms:' list"),
    ([1, 2], "reward 'x': expected a mapping with a 'terms:' list, got list"),
    ({"term": []}, "reward 'x': unknown top-level key 'term'; did you mean 'terms'? valid: ["),
    ({"cut_after_failure": True}, "reward 'x': missing field 'terms'"),
    ({"terms": {"kind": "metric"}}, "reward 'x': 'terms' must be a list, got dict"),
    ({"terms": []}, "reward 'x': 'terms' is empty"),
    ({"terms": ["progress"]}, "reward 'x', term 1: expected a mapping like {kind: metric"),
    ({"terms": [{"kind": "metric", "metric_name": "progress"}], "cut_after_failure": "no"},
     "reward 'x': cut_after_failure must be true or false"),
    ({"terms": [{"kind": "metric", "metric_name": "progress", "name": "p"},
                {"kind": "metric", "metric_name": "offroad", "name": "p"}]},
     "reward 'x', term 2: name 'p' is already used by term 1"),
])
def test_malformed_files(raw, expected):
    assert expected in error_of(raw)


def test_env_dependent_checks():
    # derived metrics are one value per episode
    assert "term 1: 'scene_score' is one value per episode; remove 'aggregation: max'" in error_of(
        one(kind="metric", metric_name="scene_score", aggregation="max"))
    assert "term 1: 'collision_at_fault' is one value per episode and has no dense form" in error_of(
        one(kind="metric", metric_name="collision_at_fault", dense=True))
    msg = error_of(one(kind="threshold", metric_name="scene_score", above=0.5))
    assert "term 1: 'scene_score' is one value per episode (no per-tick series); kind 'threshold'" in msg
    # median has no dense form: explicit, or the metric's own aggregation
    assert "term 1: aggregation 'median' of 'speed_mps' has no dense form; dense works with" in error_of(
        one(kind="metric", metric_name="speed_mps", aggregation="median", dense=True))
    own_median = {**DRIVESIM_METRICS, "speed_mps": Aggregation.MEDIAN}
    assert "aggregation 'median' of 'speed_mps'" in error_of(
        one(kind="metric", metric_name="speed_mps", dense=True), own_median)
    # distance_to_gt and threshold need a declared per-tick series
    assert "unknown metric_name 'dist_to_gt_locaton'; did you mean 'dist_to_gt_location'?" in error_of(
        one(kind="distance_to_gt", metric_name="dist_to_gt_locaton"))
    # an env without the tick-mask series cannot be scored
    no_mask = {k: v for k, v in DRIVESIM_METRICS.items() if k != "eval_relevant"}
    assert "the env declares no ['eval_relevant'] series" in error_of(
        one(kind="metric", metric_name="progress"), no_mask)
    # derived metrics need the series they derive from
    no_gt = {k: v for k, v in DRIVESIM_METRICS.items() if k != "gt_dist_traveled_m"}
    assert "metric 'scene_score' is derived from" in error_of(one(kind="metric", metric_name="scene_score"),
                                                               no_gt)
    assert "declares metric 'progress' with unknown aggregation 'avg'" in error_of(
        one(kind="metric", metric_name="progress"), {**DRIVESIM_METRICS, "progress": "avg"})


def test_python_targets_are_imported_at_validation(tmp_path, monkeypatch):
    module = tmp_path / "my_reward_terms.py"
    module.write_text(textwrap.dedent("""
        def good(series, mask, params):
            return 1.0
        def two_args(series, mask):
            return 1.0
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    RewardFn.from_mapping(one(kind="python", target="my_reward_terms:good"), DRIVESIM_METRICS)
    assert ("term 1: target 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz': "
            "ModuleNotFoundError") in error_of(one(kind="python", target="no_such_module_xyz:f"))
    assert "term 1: target 'my_reward_terms:god': 'my_reward_terms' has no 'god'; did you mean 'good'?" in (
        error_of(one(kind="python", target="my_reward_terms:god")))
    assert "term 1: target 'my_reward_terms:two_args' must accept (series, mask, params); its signature " \
           "is two_args(series, mask)" in error_of(one(kind="python", target="my_reward_terms:two_args"))
    assert "term 1: target 'my_reward_terms:NOT_CALLABLE' is a int, not a function" in error_of(
        one(kind="python", target="my_reward_terms:NOT_CALLABLE"))


def test_default_names_and_explicit_names():
    spec = parse_spec({"terms": [
        {"kind": "metric", "metric_name": "progress"},
        {"kind": "threshold", "metric_name": "ttc_s", "below": 1.0},
        {"kind": "distance_to_gt"},
        {"kind": "python", "target": "rewards.carl:carl_reward"},
        {"kind": "metric", "metric_name": "offroad", "name": "off.road-x"},
    ]})
    assert spec.term_names == ("term_1_metric_progress", "term_2_threshold_ttc_s",
                               "term_3_distance_to_gt_dist_to_gt_location", "term_4_python_carl_reward",
                               "off.road-x")


def test_termspec_direct_construction_is_checked():
    assert TermSpec(kind="distance_to_gt").metric_name == "dist_to_gt_location"
    assert TermSpec(kind="metric", metric_name="p", scale=2, clip=[0, 1]).clip == (0.0, 1.0)
    with pytest.raises(ValueError, match="key 'target' does not apply to kind 'metric'"):
        TermSpec(kind="metric", metric_name="progress", target="a:b")


def test_files_yaml_errors_and_unknown_presets(tmp_path):
    bad = write(tmp_path, "terms: [ {kind: metric\n")
    with pytest.raises(RewardSpecError, match=f"reward file '{re.escape(str(bad))}': not valid YAML"):
        load_spec(bad)
    with pytest.raises(RewardSpecError, match="reward file 'nowhere/r.yaml' not found"):
        load_spec("nowhere/r.yaml")
    with pytest.raises(RewardSpecError, match=re.escape(
            "unknown reward preset 'progress_safty'; did you mean 'progress_safety'? valid: ['carl',")):
        load_spec("progress_safty")
    good = write(tmp_path, """
        # a user's own reward
        cut_after_failure: false
        description: progress only
        terms:
          - {kind: metric, metric_name: progress}
    """)
    spec = load_spec(str(good))
    assert spec.cut_after_failure is False and spec.description == "progress only"
    assert spec.source == f"reward file '{good}'"
