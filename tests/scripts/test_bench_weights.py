"""scripts/bench_weights.py's source hash: names the code a benchmark measured."""


def test_source_sha_names_the_code_not_the_git_state(tmp_path, script):
    """Equal trees give equal hashes wherever they live; a changed, added or renamed source file
    changes it; results and caches do not."""
    m = script("bench_weights")
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "learners").mkdir(parents=True)
        (root / "learners" / "x.py").write_text("x = 1\n")
        (root / "alpagym_ray" / "conf").mkdir(parents=True)
        (root / "alpagym_ray" / "conf" / "t.yaml").write_text("k: 1\n")
    assert m.source_sha(str(a)) == m.source_sha(str(b))
    (b / "scripts" / "results").mkdir(parents=True)
    (b / "scripts" / "results" / "r.py").write_text("ignored\n")
    assert m.source_sha(str(a)) == m.source_sha(str(b))
    (b / "learners" / "x.py").write_text("x = 2\n")
    assert m.source_sha(str(a)) != m.source_sha(str(b))
    (b / "learners" / "x.py").rename(b / "learners" / "y.py")
    (b / "learners" / "y.py").write_text("x = 1\n")
    assert m.source_sha(str(a)) != m.source_sha(str(b))
    assert len(m.source_sha()) == 16
