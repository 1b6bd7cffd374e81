"""Known answers for drivesim's per-tick geometry (frames, boxes, collisions, distances, TTC)."""

from __future__ import annotations

import math

import pytest
import torch

from envs.drivesim import geometry as g


def T(*values) -> torch.Tensor:
    """``T(1.0, 2.0)`` -> tensor([1., 2.]); ``T([[...]])`` -> that nested list as a tensor."""
    return torch.tensor(values[0] if len(values) == 1 else values, dtype=torch.float32)


def car(x: float, y: float, yaw: float = 0.0, length: float = 4.5, width: float = 1.9):
    """One box as ``(center [2], yaw [], length [], width [])``."""
    return T([x, y]), T(yaw), T(length), T(width)


def random_boxes(n: int, seed: int, spread: float = 6.0):
    gen = torch.Generator().manual_seed(seed)
    center = (torch.rand(n, 2, generator=gen) - 0.5) * spread
    yaw = (torch.rand(n, generator=gen) - 0.5) * 2 * math.pi
    length = 1.0 + 5.0 * torch.rand(n, generator=gen)
    width = 0.5 + 2.0 * torch.rand(n, generator=gen)
    return center, yaw, length, width


# ---- angles and frames --------------------------------------------------------------------------
def test_wrap_angle_known_values_and_range():
    a = T(3 * math.pi / 2, -3 * math.pi / 2, math.pi, 0.25, 6 * math.pi + 1.0)
    out = g.wrap_angle(a)
    assert torch.allclose(out, T(-math.pi / 2, math.pi / 2, -math.pi, 0.25, 1.0), atol=1e-5)
    r = g.wrap_angle(torch.linspace(-50, 50, 1001))
    assert (r >= -math.pi).all() and (r <= math.pi).all()
    assert torch.allclose(torch.cos(r), torch.cos(torch.linspace(-50, 50, 1001)), atol=1e-4)


def test_to_frame_known_answer_and_round_trip():
    # frame at (1, 2) facing +y: the world point (1, 3) is 1 m straight ahead, (0, 2) 1 m to the left
    p = T([[1.0, 3.0], [0.0, 2.0]])
    local = g.to_frame(p, T([1.0, 2.0]), T(math.pi / 2))
    assert torch.allclose(local, T([[1.0, 0.0], [0.0, 1.0]]), atol=1e-6)
    # batched: points [B, P, 2] against origins [B, 1, 2] / [B, 1]
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(3, 5, 2, generator=gen) * 10
    origin, yaw = torch.randn(3, 2, generator=gen), torch.randn(3, generator=gen)
    local = g.to_frame(pts, origin[:, None], yaw[:, None])
    assert local.shape == (3, 5, 2)
    assert torch.allclose(g.from_frame(local, origin[:, None], yaw[:, None]), pts, atol=1e-5)
    # distances are preserved
    assert torch.allclose(local.norm(dim=-1), (pts - origin[:, None]).norm(dim=-1), atol=1e-5)


def test_poses_round_trip_wraps_yaw():
    poses = T([[2.0, 0.0, 3.0], [0.0, -1.0, -3.0]])
    local = g.poses_to_frame(poses, T([0.0, 0.0]), T(math.pi))
    assert torch.allclose(local[:, :2], T([[-2.0, 0.0], [0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(local[:, 2], g.wrap_angle(T(3.0 - math.pi, -3.0 - math.pi)), atol=1e-6)
    back = g.poses_from_frame(local, T([0.0, 0.0]), T(math.pi))
    assert torch.allclose(back, poses, atol=1e-5)


# ---- boxes --------------------------------------------------------------------------------------
def test_box_corners_order():
    c = g.box_corners(T([0.0, 0.0]), T(0.0), T(4.0), T(2.0))
    assert torch.allclose(c, T([[2, 1], [2, -1], [-2, -1], [-2, 1]]))
    c = g.box_corners(T([[10.0, 5.0]]), T([math.pi / 2]), T([4.0]), T([2.0]))   # facing +y
    assert c.shape == (1, 4, 2)
    assert torch.allclose(c[0], T([[9, 7], [11, 7], [11, 3], [9, 3]]), atol=1e-6)


def test_touching_and_separated_boxes():
    a = car(0.0, 0.0, length=4.0, width=2.0)
    touching = car(4.0, 0.0, length=4.0, width=2.0)           # rear bumper on a's front bumper
    assert g.boxes_overlap(*a, *touching, shrink=0.0)
    assert not g.boxes_overlap(*a, *touching)                 # AlpaSim's 2 % shrink separates them
    assert not g.boxes_overlap(*a, *car(4.1, 0.0, length=4.0, width=2.0), shrink=0.0)
    # side by side, touching along the long side
    assert g.boxes_overlap(*a, *car(0.0, 2.0, length=4.0, width=2.0), shrink=0.0)
    assert not g.boxes_overlap(*a, *car(0.0, 2.01, length=4.0, width=2.0), shrink=0.0)
    # a diamond whose corner stops 0.05 m short of a's front face, then pokes 0.05 m in
    half_diag = math.sqrt(2.0)
    assert not g.boxes_overlap(*a, *car(2.05 + half_diag, 0.0, math.pi / 4, 2.0, 2.0), shrink=0.0)
    assert g.boxes_overlap(*a, *car(1.95 + half_diag, 0.0, math.pi / 4, 2.0, 2.0), shrink=0.0)


def test_crossing_boxes_overlap_without_corners_inside():
    # a plus sign: no corner of either box lies in the other
    assert g.boxes_overlap(*car(0, 0, 0.0, 10.0, 1.0), *car(0, 0, math.pi / 2, 10.0, 1.0))


def test_boxes_overlap_broadcasts_ego_against_agents():
    ego = (T([[0.0, 0.0]]), T([0.0]), T([4.5]), T([1.9]))                  # [B=1, 1]
    ego = tuple(x[:, None] if x.dim() == 1 else x[:, None, :] for x in ego)
    agents = (T([[[3.0, 0.0], [20.0, 0.0], [0.0, 1.5]]]), T([[0.0, 0.0, 0.3]]),
              T([[4.5, 4.5, 4.5]]), T([[1.9, 1.9, 1.9]]))                   # [B=1, N=3]
    out = g.boxes_overlap(*ego, *agents)
    assert out.shape == (1, 3)
    assert out.tolist() == [[True, False, True]]


def overlap_by_edges(ca, cb) -> torch.Tensor:
    """Independent reference: convex polygons intersect iff an edge of one meets the other, or one
    lies inside the other (its first corner then lies inside)."""
    hit = torch.zeros(ca.shape[0], dtype=torch.bool)
    for i in range(4):
        hit |= g.segment_intersects_box(ca[:, i], ca[:, (i + 1) % 4], cb)
        hit |= g.segment_intersects_box(cb[:, i], cb[:, (i + 1) % 4], ca)
    return hit


def test_boxes_overlap_matches_edge_reference_on_random_pairs():
    a, b = random_boxes(3000, 1), random_boxes(3000, 2)
    got = g.boxes_overlap(*a, *b, shrink=0.0)
    want = overlap_by_edges(g.box_corners(*a), g.box_corners(*b))
    assert 0.1 < want.float().mean() < 0.9
    assert torch.equal(got, want)


# ---- segments -----------------------------------------------------------------------------------
def test_segment_intersects_box_cases():
    box = g.box_corners(T([0.0, 0.0]), T(0.0), T(4.0), T(2.0))             # |x| <= 2, |y| <= 1
    cases = [
        (([-5, 0], [5, 0]), True),           # crosses through
        (([-0.5, 0.2], [0.5, -0.2]), True),  # wholly inside
        (([-5, 2], [5, 2]), False),          # parallel, above
        (([-5, 1], [5, 1]), True),           # along the top edge (collinear)
        (([2, 3], [2, 1]), True),            # ends on the front-left corner
        (([3, 0], [6, 0]), False),           # on the axis, beyond the front
        (([1.5, 3], [3.5, 1]), False),       # x + y = 4.5 passes outside the corner (x + y = 3)
        (([0, 3], [3, 0]), True),            # x + y = 3 grazes the corner (2, 1)
        (([0.5, 3], [2.5, 0.5]), False),     # passes 0.1 m outside that corner
        (([0.5, 0.5], [0.5, 0.5]), True),    # a point inside
        (([2.5, 0.0], [2.5, 0.0]), False),   # a point outside
    ]
    for (p0, p1), want in cases:
        got = g.segment_intersects_box(T(p0), T(p1), box)
        assert bool(got) is want, (p0, p1)
        assert bool(g.segment_intersects_rect(T(p0), T(p1), box)) is want, (p0, p1)


def test_segment_intersects_rect_matches_general_test():
    gen = torch.Generator().manual_seed(3)
    corners = g.box_corners(*random_boxes(4000, 4, spread=2.0))
    p0 = (torch.rand(4000, 2, generator=gen) - 0.5) * 8
    p1 = p0 + (torch.rand(4000, 2, generator=gen) - 0.5) * 6
    want = g.segment_intersects_box(p0, p1, corners)
    assert 0.1 < want.float().mean() < 0.9
    assert torch.equal(g.segment_intersects_rect(p0, p1, corners), want)


def test_point_segment_distance():
    d, t = g.point_segment_distance(T([[0.0, 1.0], [3.0, 4.0], [-2.0, 0.0]]), T([-1.0, 0.0]), T([1.0, 0.0]))
    assert torch.allclose(d, T(1.0, math.hypot(2.0, 4.0), 1.0))
    assert torch.allclose(t, T(0.5, 1.0, 0.0))
    d, t = g.point_segment_distance(T([3.0, 4.0]), T([0.0, 0.0]), T([0.0, 0.0]))   # degenerate
    assert float(d) == pytest.approx(5.0) and float(t) == 0.0


# ---- collision classes --------------------------------------------------------------------------
def classes(ego, other):
    return tuple(bool(x) for x in g.classify_collision(*ego, *other))


def test_head_on_and_ego_hitting_car_ahead_are_front():
    ego = car(0.0, 0.0)
    assert classes(ego, car(4.3, 0.0, math.pi)) == (True, False, False)      # head-on
    assert classes(ego, car(4.3, 0.3)) == (True, False, False)               # rear-ending a car ahead
    # ego's nose into the side of a crossing car
    assert classes(ego, car(2.25 + 0.8, 0.0, math.pi / 2)) == (True, False, False)


def test_being_hit_from_behind_is_rear():
    ego = car(0.0, 0.0)
    assert classes(ego, car(-4.3, 0.0)) == (False, True, False)
    assert classes(ego, car(-4.3, -0.4, 0.1)) == (False, True, False)


def test_side_swipe_and_t_bone_are_lateral():
    ego = car(0.0, 0.0)
    # a shorter car alongside, overlapping the ego's left side by 0.1 m, between the bumper lines
    assert classes(ego, car(0.3, 1.8, 0.0, length=3.5)) == (False, False, True)
    # another car's nose into the ego's right door
    assert classes(ego, car(0.0, -(0.95 + 2.0), math.pi / 2)) == (False, False, True)


def test_no_overlap_no_class_and_classes_exclusive():
    assert classes(car(0.0, 0.0), car(10.0, 0.0)) == (False, False, False)
    a, b = random_boxes(3000, 5, spread=5.0), random_boxes(3000, 6, spread=5.0)
    front, rear, lateral = g.classify_collision(*a, *b)
    overlap = g.boxes_overlap(*a, *b)
    assert torch.equal(front | rear | lateral, overlap)
    assert not (front & rear).any() and not (front & lateral).any() and not (rear & lateral).any()
    # the same rule through the general quadrilateral test
    ea = g.box_corners(a[0], a[1], a[2] * 0.98, a[3] * 0.98)
    eb = g.box_corners(b[0], b[1], b[2] * 0.98, b[3] * 0.98)
    want_front = overlap & g.segment_intersects_box(ea[:, 0], ea[:, 1], eb)
    want_rear = overlap & ~want_front & g.segment_intersects_box(ea[:, 2], ea[:, 3], eb)
    assert front.any() and rear.any() and lateral.any()
    assert torch.equal(front, want_front) and torch.equal(rear, want_rear)


# ---- distances ----------------------------------------------------------------------------------
def test_box_distance_parallel_gaps():
    a = car(0.0, 0.0, length=4.0, width=2.0)
    assert float(g.box_distance(*a, *car(5.5, 0.0, length=4.0, width=2.0))) == pytest.approx(1.5, abs=1e-5)
    assert float(g.box_distance(*a, *car(0.0, -3.2, length=4.0, width=2.0))) == pytest.approx(1.2, abs=1e-5)
    # diagonal: corner (2, 1) to corner (5, 5)
    assert float(g.box_distance(*a, *car(7.0, 6.0, length=4.0, width=2.0))) == pytest.approx(5.0, abs=1e-5)
    # a diamond whose corner points at a's front face from 0.7 m
    d = g.box_distance(*a, *car(2.7 + math.sqrt(2), 0.3, math.pi / 4, 2.0, 2.0))
    assert float(d) == pytest.approx(0.7, abs=1e-5)
    assert float(g.box_distance(*a, *car(1.0, 0.5, 0.3))) == 0.0          # overlapping


def test_box_distance_matches_dense_boundary_sampling():
    a, b = random_boxes(200, 7, spread=12.0), random_boxes(200, 8, spread=12.0)
    got = g.box_distance(*a, *b)
    s = torch.linspace(0, 1, 121)                            # <= 0.05 m apart on edges up to 6 m

    def outline(corners):                                    # [n, 4 * 121, 2]
        nxt = torch.roll(corners, -1, dims=1)
        return (corners[:, :, None] + s[None, None, :, None] * (nxt - corners)[:, :, None]).reshape(
            corners.shape[0], -1, 2)

    pa, pb = outline(g.box_corners(*a)), outline(g.box_corners(*b))
    want = torch.cdist(pa, pb).amin(dim=(1, 2))
    overlap = g.boxes_overlap(*a, *b, shrink=0.0)
    assert (got[overlap] == 0).all()
    sep = ~overlap
    assert sep.sum() > 100
    # sampling only over-estimates, by at most a sample step (half a step on each box)
    assert (got[sep] <= want[sep] + 1e-4).all()
    assert (want[sep] - got[sep]).max() < 0.05
    assert torch.allclose(g.box_distance(*b, *a), got, atol=1e-4)


# ---- time to collision --------------------------------------------------------------------------
def ttc(a, va, b, vb, horizon: float = 10.0) -> float:
    return float(g.time_to_collision(*a, T(va), *b, T(vb), horizon=horizon))


def test_ttc_head_on_known_answer():
    # two 4.5 m cars, centres 30 m apart, closing at 10 + 10 m/s: bumpers meet after (30 - 4.5) / 20
    assert ttc(car(0, 0), [10, 0], car(30, 0, math.pi), [-10, 0]) == pytest.approx(1.275, abs=1e-4)
    # a faster follower: 20.5 m centre gap, 5 m/s closing
    assert ttc(car(0, 0), [15, 0], car(20.5, 0.5), [10, 0]) == pytest.approx(16.0 / 5.0, abs=1e-4)


def test_ttc_crossing_paths_and_no_conflict():
    # ego from the west, other from the south, both 4 x 2 at 10 m/s: contact when each front
    # reaches the other's side, at t = (20 - 2 - 1) / 10
    a, b = car(-20, 0, 0.0, 4.0, 2.0), car(0, -20, math.pi / 2, 4.0, 2.0)
    assert ttc(a, [10, 0], b, [0, 10]) == pytest.approx(1.7, abs=1e-4)
    assert ttc(car(0, 0), [10, 0], car(20, 0), [15, 0]) == 10.0               # moving apart
    assert ttc(car(0, 0), [10, 0], car(30, 3.7, math.pi), [-10, 0]) == 10.0   # passing in the next lane
    assert ttc(car(0, 0), [10, 0], car(300, 0, math.pi), [-10, 0]) == 10.0    # beyond the horizon
    assert ttc(car(0, 0), [0, 0], car(2.0, 0.5), [0, 0]) == 0.0               # already overlapping
    assert ttc(car(0, 0), [0, 0], car(10, 0), [0, 0]) == 10.0                 # both still


def test_ttc_is_first_contact_on_random_pairs():
    a, b = random_boxes(2000, 9, spread=30.0), random_boxes(2000, 10, spread=30.0)
    gen = torch.Generator().manual_seed(11)
    va, vb = torch.randn(2000, 2, generator=gen) * 8, torch.randn(2000, 2, generator=gen) * 8
    t = g.time_to_collision(*a, va, *b, vb, horizon=10.0, shrink=0.0)

    def overlap_at(tt):
        return g.boxes_overlap(a[0] + va * tt[:, None], a[1], a[2], a[3],
                               b[0] + vb * tt[:, None], b[1], b[2], b[3], shrink=0.0)

    hit = (t > 0.01) & (t < 10.0)
    assert hit.sum() > 50
    assert overlap_at(t + 1e-3)[hit].all()
    assert not overlap_at((t - 1e-3).clamp(min=0))[hit].any()
    # no contact at any sampled time for pairs reported as beyond the horizon
    never = t == 10.0
    for tt in torch.linspace(0, 10, 201):
        assert not overlap_at(torch.full((2000,), float(tt)))[never].any()


@pytest.mark.gpu
def test_same_answers_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a, b = random_boxes(1000, 12), random_boxes(1000, 13)
    va = torch.randn(1000, 2)
    cuda = lambda xs: tuple(x.cuda() for x in xs)  # noqa: E731
    assert torch.equal(g.boxes_overlap(*a, *b).cpu(), g.boxes_overlap(*cuda(a), *cuda(b)).cpu())
    for x, y in zip(g.classify_collision(*a, *b), g.classify_collision(*cuda(a), *cuda(b)), strict=True):
        assert torch.equal(x, y.cpu())
    assert torch.allclose(g.box_distance(*a, *b), g.box_distance(*cuda(a), *cuda(b)).cpu(), atol=1e-4)
    t_cpu = g.time_to_collision(*a, va, *b, -va)
    t_gpu = g.time_to_collision(*cuda(a), va.cuda(), *cuda(b), -va.cuda()).cpu()
    assert torch.allclose(t_cpu, t_gpu, atol=1e-4)
