import json

import pytest


@pytest.mark.ray
def test_bench_load_smoke_on_cpu(ray_session, tmp_path, script):
    """A few tiny groups on the CPU, both modes and storages: the JSON names every (storage, pinned)
    with its rows, bytes and timings, in the session's Ray cluster (the script leaves it running)."""
    out = tmp_path / "bench_load.json"
    result = script("bench_load").main(["--device", "cpu", "--groups", "3", "--rows-per-group", "10",
                                        "--group-size", "4", "--repeats", "1", "--floor-mib", "1", "--out", str(out)])
    assert ray_session.is_initialized()
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    loads = {(r["storage"], r["pinned"]): r for r in result["loads"]}
    assert set(loads) == {(s, p) for s in ("float32", "float16") for p in (True, False)}
    for r in loads.values():
        assert r["rows"] == 30 and r["seconds"] > 0 and r["gb_per_s"] > 0
        assert set(r["breakdown"]) == {"get_table_s", "index_in_s", "observations_s", "action_s", "staging_wait_s"}
    assert loads[("float16", True)]["bytes"] < loads[("float32", True)]["bytes"]
    assert result["floor"]["host_memcpy_gb_per_s"] > 0
