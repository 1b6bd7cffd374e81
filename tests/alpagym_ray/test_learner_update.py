"""One GRPO iteration: the learner's update equals a plain single-process reference, and two gloo
learners sharing the global batch make exactly the update of one."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from alpagym_ray.learner import grpo_update
from alpagym_ray.observations import SPECS, mask_key
from learners.grpo import GRPO, GRPOConfig, group_advantages
from learners.trajectory_policy import build_policy

KEYS = ("ego_history", "route")
G, GROUPS, DECISIONS = 4, 4, 3


def make_batch(seed: int = 0):
    """GROUPS groups of G episodes with DECISIONS rows each: obs, actions sampled from the policy."""
    torch.manual_seed(seed)
    policy = build_policy(size="tiny", obs_keys=KEYS, horizon=20)
    rows = GROUPS * G * DECISIONS
    obs = {}
    for k in KEYS:
        obs[k] = torch.randn(rows, *SPECS[k].shape) * 0.5
        obs[mask_key(k)] = torch.ones(rows, SPECS[k].shape[0], dtype=torch.bool)
    with torch.no_grad():
        action, logp, _ = policy.act(obs, generator=torch.Generator().manual_seed(seed))
    returns = torch.randn(GROUPS, G)
    adv, _ = group_advantages(returns)
    advantage = adv.reshape(-1).repeat_interleave(DECISIONS)  # rows ordered group, episode, decision
    behaviour = logp + 0.1 * torch.randn(rows)  # as if a stale worker had acted
    return policy, {"obs": obs, "action": action, "logp_behavior": behaviour, "advantage": advantage}


def rows_of_groups(batch: dict, groups: range) -> dict:
    sel = torch.cat([torch.arange(g * G * DECISIONS, (g + 1) * G * DECISIONS) for g in groups])
    out = {k: v[sel] for k, v in batch.items() if k != "obs"}
    out["obs"] = {k: v[sel] for k, v in batch["obs"].items()}
    return out


def with_logp_old(policy, mb: dict) -> dict:
    with torch.no_grad():
        mb["logp_old"] = policy.log_prob(mb["obs"], mb["action"]).float()
    return mb


def reference_step(policy, batch: dict, lr: float, cfg: GRPOConfig):
    """A plain single-process GRPO step written out without the project's helpers."""
    policy = copy.deepcopy(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=lr, eps=1e-6)
    with torch.no_grad():
        logp_old = policy.log_prob(batch["obs"], batch["action"])
    logp = policy.log_prob(batch["obs"], batch["action"])
    ratio = torch.exp(logp - logp_old)
    a = batch["advantage"]
    obj = torch.minimum(ratio * a, ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * a)
    obj = torch.where(a < 0, torch.maximum(obj, cfg.dual_clip * a), obj)
    w = torch.exp(logp_old - batch["logp_behavior"]).clamp(max=cfg.is_cap)
    loss = -(w * obj).sum() / len(a)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return policy


def project_step(policy, mbs: list[dict], global_rows: list[int], lr: float, algo: GRPO, world: int = 1):
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, eps=1e-6)
    return grpo_update(policy, opt, params, mbs, global_rows, algo, epochs=1, max_grad_norm=1.0, world=world)


def test_synchronous_update_equals_plain_reference():
    policy, batch = make_batch()
    algo = GRPO()
    ref = reference_step(policy, batch, 1e-3, algo.config)
    mine = copy.deepcopy(policy)
    stats = project_step(mine, [with_logp_old(mine, dict(batch))], [len(batch["advantage"])], 1e-3, algo)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # ratio is 1 in synchronous mode
    for (name, a), b in zip(ref.state_dict().items(), mine.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _rank(rank: int, world: int, port: int, policy_state: dict, batch: dict, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    policy = build_policy(size="tiny", obs_keys=KEYS, horizon=20)
    policy.load_state_dict(policy_state)
    share = GROUPS // world
    mb = with_logp_old(policy, rows_of_groups(batch, range(rank * share, (rank + 1) * share)))
    project_step(policy, [mb], [len(batch["advantage"])], 1e-3, GRPO(), world=world)
    if rank == 0:
        out["state"] = {k: v.clone() for k, v in policy.state_dict().items()}
    dist.destroy_process_group()


def test_two_gloo_learners_equal_one_on_the_same_global_batch():
    policy, batch = make_batch(seed=1)
    one = copy.deepcopy(policy)
    project_step(one, [with_logp_old(one, dict(batch))], [len(batch["advantage"])], 1e-3, GRPO())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        procs = [ctx.Process(target=_rank, args=(r, 2, port, policy.state_dict(), batch, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        two = dict(out["state"])
    for name, a in one.state_dict().items():
        torch.testing.assert_close(two[name], a, rtol=1e-5, atol=1e-6, msg=name)


def test_micro_batches_accumulate_to_the_full_batch_update():
    policy, batch = make_batch(seed=2)
    full, micro = copy.deepcopy(policy), copy.deepcopy(policy)
    rows = len(batch["advantage"])
    # plain SGD: the step is linear in the (clipped) gradient, so equal weights mean equal summed
    # gradients. Adam's first step is lr * sign(g) and turns float-rounding differences of
    # near-zero gradient entries into differences of up to lr.
    params = [p for p in full.parameters() if p.requires_grad]
    grpo_update(full, torch.optim.SGD(params, lr=1e-2), params, [with_logp_old(full, dict(batch))],
                [rows], GRPO(), 1, 1.0, micro_batch_rows=rows)
    params = [p for p in micro.parameters() if p.requires_grad]
    grpo_update(micro, torch.optim.SGD(params, lr=1e-2), params, [with_logp_old(micro, dict(batch))],
                [rows], GRPO(), 1, 1.0, micro_batch_rows=7)
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), full.state_dict().values(),
                                                      strict=True))  # the update moved the weights
    for name, a in full.state_dict().items():
        torch.testing.assert_close(micro.state_dict()[name], a, rtol=1e-5, atol=1e-6, msg=name)


def test_the_learner_builds_its_algorithm_and_checkpoint_io_from_config():
    from alpagym_ray.learner import build_algorithm, checkpoint_io

    algo = build_algorithm({"algorithm": {"_target_": "learners.grpo.GRPO", "kl_coef": 0.1}})
    assert isinstance(algo, GRPO) and algo.needs_reference and algo.config.kl_coef == 0.1
    with pytest.raises(ValueError, match="learner.algorithm is missing.*former learner.grpo fields"):
        build_algorithm({"grpo": {"kl_coef": 0.1}})
    with pytest.raises(ValueError, match="must be a config node with a _target_"):
        build_algorithm({"algorithm": {"kl_coef": 0.1}})
    with pytest.raises(ValueError, match=r"built GRPOConfig, which lacks the methods \['advantages', 'loss'\]"):
        build_algorithm({"algorithm": {"_target_": "learners.grpo.GRPOConfig"}})
    with pytest.raises(TypeError, match="building learners.grpo.GRPO with \\['eps'\\]"):
        build_algorithm({"algorithm": {"_target_": "learners.grpo.GRPO", "eps": 0.1}})
    io = checkpoint_io("learners.checkpoint")
    assert callable(io.save_checkpoint) and callable(io.load_optimizer_state)
    with pytest.raises(ValueError, match=r"learner.checkpoint_io 'learners.grpo' lacks \['save_checkpoint'"):
        checkpoint_io("learners.grpo")
    with pytest.raises(ImportError, match="learner.checkpoint_io 'learners.nope': cannot import it"):
        checkpoint_io("learners.nope")
    with pytest.raises(ValueError, match="must be a module path"):
        checkpoint_io(None)


def test_the_first_minibatch_takes_pi_old_from_its_own_first_pass():
    """Without ``logp_old`` the first minibatch's π_old is its first (pre-step) pass: the same update
    over 2 minibatches x 2 epochs as with π_old computed beforehand."""
    policy, batch = make_batch(seed=3)
    rows = len(batch["advantage"])
    halves = [rows_of_groups(batch, range(0, GROUPS // 2)), rows_of_groups(batch, range(GROUPS // 2, GROUPS))]
    given, filled = copy.deepcopy(policy), copy.deepcopy(policy)
    for model, fill in ((given, False), (filled, True)):
        mbs = [dict(mb) for mb in halves]
        for m, mb in enumerate(mbs):
            if not (fill and m == 0):
                with_logp_old(model, mb)
        params = [p for p in model.parameters() if p.requires_grad]
        grpo_update(model, torch.optim.SGD(params, lr=1e-2), params, mbs, [rows // 2] * 2, GRPO(), 2, 1.0,
                    micro_batch_rows=5)
        if fill:  # kept for the second epoch: the log-probs of the starting weights
            torch.testing.assert_close(mbs[0]["logp_old"], with_logp_old(policy, dict(halves[0]))["logp_old"])
    for name, a in given.state_dict().items():
        torch.testing.assert_close(filled.state_dict()[name], a, rtol=1e-5, atol=1e-6, msg=name)
    mbs = [with_logp_old(policy, dict(halves[0])), dict(halves[1])]
    params = [p for p in policy.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="minibatch 1 has no logp_old"):
        grpo_update(policy, torch.optim.SGD(params, lr=1e-2), params, mbs, [rows // 2] * 2, GRPO(), 1, 1.0)
