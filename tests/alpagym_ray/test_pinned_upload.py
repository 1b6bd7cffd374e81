import numpy as np
import pyarrow as pa
import pytest
import torch

from alpagym_ray import columns as C
from alpagym_ray.observations import SPECS, mask_key
from alpagym_ray.pinned_upload import PinnedStaging, staging_for

KEYS = ("ego_history", "route")
ROWS = (0, 1, 4, 13, 0, 2, 3, 8, 16, 1, 0)
"""Part sizes in rows of 4 elements: with 64-byte slots and float32 (16 bytes a row), smaller than a slot,
exactly one (4), several (13: 3.25 slots), empty; the offsets in the slots drift, so parts straddle slots."""


def parts_of(dtype: torch.dtype, rows=ROWS, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return [torch.rand(n, 4, generator=gen) > 0.5 for n in rows]
    return [torch.randn(n, 4, generator=gen).to(dtype) for n in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_upload_reproduces_the_concatenation(dtype, slots):
    """Small parts share a slot, a part bigger than a slot spans several, empty parts are skipped: the
    result is byte for byte ``torch.cat(parts)``, and so is a second upload through the reused slots."""
    staging = PinnedStaging(slot_bytes=64, slots=slots, pin=False)
    for seed in (0, 1):
        parts = parts_of(dtype, seed=seed)
        out = torch.empty(sum(ROWS), 4, dtype=dtype)
        staging.upload(parts, out)
        assert torch.equal(out, torch.cat(parts))
    assert staging.bytes == 2 * out.numel() * out.element_size()


def test_upload_of_nothing_and_of_exact_slots():
    staging = PinnedStaging(slot_bytes=64, pin=False)
    staging.upload([torch.empty(0, 4)], torch.empty(0, 4))
    staging.upload([], torch.empty(0))
    parts = parts_of(torch.float32, rows=(4, 4, 8))  # 1, 1 and 2 slots exactly
    out = torch.empty(16, 4)
    staging.upload(parts, out)
    assert torch.equal(out, torch.cat(parts))


def test_upload_rejects_mismatched_parts():
    staging = PinnedStaging(slot_bytes=64, pin=False)
    with pytest.raises(ValueError, match=r"parts hold 48 bytes, out holds 64 bytes"):
        staging.upload([torch.zeros(3, 4)], torch.empty(4, 4))
    with pytest.raises(ValueError, match=r"part 1 is torch.float16, out is torch.float32"):
        staging.upload([torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float16)], torch.empty(4, 4))
    with pytest.raises(ValueError, match="must be contiguous"):
        staging.upload([torch.zeros(4, 4)], torch.empty(4, 4).t())
    with pytest.raises(ValueError, match="must be >= 1"):
        PinnedStaging(slot_bytes=0)


def test_no_staging_for_the_host():
    assert staging_for("cpu") is None
    assert staging_for(torch.device("cpu")) is None


def step_table(storage: str, rows=(5, 0, 17, 3)) -> pa.Table:
    """Decision rows of ``KEYS`` in batches of ``rows`` (random observations, random masks)."""
    rng = np.random.default_rng(0)
    schema = C.step_schema(KEYS, 20, storage)
    npdt = np.float16 if storage == "float16" else np.float32
    batches = []
    for n in rows:
        cols = {C.EPISODE_ID: ["g/0"] * n, C.GROUP_ID: ["g"] * n, C.SCENE_ID: ["s"] * n,
                C.STEP: np.arange(n, dtype=np.int32), C.POLICY_VERSION: np.zeros(n, np.int64),
                C.ACTION: rng.standard_normal((n, 20, 3), np.float32), C.LOGP_BEHAVIOR: np.zeros(n, np.float32),
                C.REWARD: np.zeros(n, np.float32), C.DONE: np.zeros(n, bool)}
        for k in KEYS:
            cols[C.obs_column(k)] = rng.standard_normal((n, *SPECS[k].shape)).astype(npdt)
            cols[C.obs_column(mask_key(k))] = rng.random((n, SPECS[k].shape[0])) > 0.5
        batches.append(C.build_step_batch(schema, cols))
    return pa.Table.from_batches(batches)


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_column_to_through_staging_matches_the_plain_copies(monkeypatch, storage):
    """column_to's staged path (forced onto the host with unpinned slots of 100 bytes) gives what the
    plain per-chunk path gives: float32 observations whatever the storage, bool masks, float32 actions."""
    table = step_table(storage)
    plain = C.observations(table, KEYS, "cpu")
    plain_action = C.column_to(table, C.ACTION, (20, 3), "cpu")
    staging = PinnedStaging(slot_bytes=100, pin=False)
    monkeypatch.setattr(C, "staging_for", lambda device: staging)
    staged = C.observations(table, KEYS, "cpu", pinned=True)
    assert staging.bytes > 0
    for k, v in plain.items():
        assert staged[k].dtype == v.dtype and torch.equal(staged[k], v), k
    assert torch.equal(C.column_to(table, C.ACTION, (20, 3), "cpu", pinned=True), plain_action)
    before = staging.bytes
    unstaged = C.observations(table, KEYS, "cpu", pinned=False)
    assert staging.bytes == before and all(torch.equal(unstaged[k], v) for k, v in plain.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_pinned_upload_to_cuda(dtype):
    """The real path: pinned slots, asynchronous copies on a side stream (as the learner loads), parts
    dropped as soon as upload returns; several uploads back to back reuse the slots."""
    staging = PinnedStaging(slot_bytes=4096, pin=True)
    expected, outs = [], []
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for seed in range(4):
            parts = parts_of(dtype, rows=tuple(r * 37 for r in ROWS), seed=seed)
            expected.append(torch.cat(parts))
            out = torch.empty(expected[-1].shape, dtype=dtype, device="cuda")
            staging.upload(parts, out)
            del parts
            outs.append(out)
    stream.synchronize()
    for out, want in zip(outs, expected, strict=True):
        assert torch.equal(out.cpu(), want)
    assert all(b.is_pinned() for b in staging._buffers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_column_to_cuda_matches_the_host(storage):
    table = step_table(storage, rows=(500, 0, 1700, 3))
    host = C.observations(table, KEYS, "cpu")
    for pinned in (True, False):
        on_gpu = C.observations(table, KEYS, "cuda", pinned=pinned)
        torch.cuda.synchronize()
        for k, v in host.items():
            assert on_gpu[k].dtype == v.dtype and torch.equal(on_gpu[k].cpu(), v), (k, pinned)
    assert staging_for("cuda") is staging_for(torch.device("cuda", torch.cuda.current_device()))


@pytest.mark.ray
@pytest.mark.parametrize("pinned", [True, False])
def test_load_groups_stages_only_when_asked(ray_session, monkeypatch, pinned):
    """``learner.pinned_upload`` reaches the copies: load_groups(pinned=True) sends every observation
    and action byte through the staging and gives the same tensors as the plain path."""
    from alpagym_ray.learner import load_groups
    from learners.grpo import GRPO

    class Meta:
        group_id, returns = "g", [0.0, 1.0]

    table = step_table("float16", rows=(9,))
    entries = [(Meta(), ray_session.put(table.to_batches()[0]))]
    staging = PinnedStaging(slot_bytes=256, pin=False)
    monkeypatch.setattr(C, "staging_for", lambda device: staging)
    staged = load_groups(entries, KEYS, 20, "cpu", GRPO(), pinned=pinned)
    plain = load_groups(entries, KEYS, 20, "cpu", GRPO(), pinned=False)
    value_bytes = 9 * (sum(int(np.prod(SPECS[k].shape)) * 2 + SPECS[k].shape[0] for k in KEYS) + 20 * 3 * 4)
    assert staging.bytes == (value_bytes if pinned else 0)
    for k, v in plain["obs"].items():
        assert torch.equal(staged["obs"][k], v), k
    assert torch.equal(staged["action"], plain["action"])
