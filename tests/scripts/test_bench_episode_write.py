import json


def test_bench_episode_write_smoke(tmp_path, script):
    """A few groups: the JSON has both paths' timings, and the writer put every group in fewer files."""
    out = tmp_path / "bench.json"
    args = ["--groups", "12", "--group-size", "4", "--decisions", "5", "--out", str(out)]
    result = script("bench_episode_write").main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["inline_files"] == 12 and 1 <= result["writer_files"] <= 12
    assert result["inline_ms_per_group"] > 0 and result["writer_call_us_per_group"] > 0
    assert result["writer_drain_s"] >= result["writer_calls_s_per_iteration"]


def test_the_benchmark_batch_has_the_workers_episode_schema(script):
    import numpy as np

    from alpagym_ray import columns as C

    batch = script("bench_episode_write").episodes_batch("g0-0000001", 3, 7, np.random.default_rng(0))
    assert batch.num_rows == 3 and batch.column(C.GROUP_ID).to_pylist() == ["g0-0000001"] * 3
    assert [len(v) for v in batch.column(C.TRAJ_X).to_pylist()] == [7, 7, 7]
