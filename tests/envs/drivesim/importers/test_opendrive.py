"""OpenDRIVE parsing against known geometry: a straight, an arc and a clothoid (fixtures/three_roads.xodr),
plus lane offsets, widening lanes, poly3 / paramPoly3, junctions, left-hand traffic and bad files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from envs.drivesim.importers.opendrive import eval_spiral, parse_opendrive
from envs.drivesim.scene import LinkKind, SceneError

FIXTURE = Path(__file__).parent / "fixtures" / "three_roads.xodr"


@pytest.fixture(scope="module")
def odr():
    return parse_opendrive(FIXTURE.read_text(), str(FIXTURE))


def lanes(odr):
    return {ln.key: ln for ln in odr.lanes}


def numeric_clothoid(x0, y0, h0, k0, k1, length, n=200_001):
    u = np.linspace(0.0, length, n)
    h = h0 + k0 * u + 0.5 * (k1 - k0) / length * u * u
    du = u[1] - u[0]
    x = x0 + np.concatenate([[0], np.cumsum(0.5 * (np.cos(h[1:]) + np.cos(h[:-1])) * du)])
    y = y0 + np.concatenate([[0], np.cumsum(0.5 * (np.sin(h[1:]) + np.sin(h[:-1])) * du)])
    return x, y, h


@pytest.mark.parametrize(
    "k0, k1, length", [(0.0, 0.02, 40.0), (0.01, 0.0, 40.0), (-0.05, 0.03, 25.0), (0.02, 0.02 + 1e-9, 30.0)]
)
def test_spiral_matches_numerical_integration(k0, k1, length):
    u = np.linspace(0, length, 9)
    x, y, h = eval_spiral(3.0, -2.0, 0.3, k0, k1, length, u)
    nx, ny, nh = numeric_clothoid(3.0, -2.0, 0.3, k0, k1, length)
    idx = np.round(u / length * (len(nx) - 1)).astype(int)
    np.testing.assert_allclose(x, nx[idx], atol=1e-6)
    np.testing.assert_allclose(y, ny[idx], atol=1e-6)
    np.testing.assert_allclose(h, nh[idx], atol=1e-12)


def test_straight_road_lanes_widths_edges_and_marks(odr):
    ln = lanes(odr)
    assert set(ln) == {"1:0:1", "1:0:-1", "1:0:-2", "2:0:1", "2:0:-1", "2:0:-2", "3:0:1", "3:0:-1", "3:0:-2"}
    r = ln["1:0:-1"]  # right lane: travels along +s, centre 1.75 m right of the reference line
    np.testing.assert_allclose(r.center[:, 1], -1.75, atol=1e-12)
    assert r.center[0, 0] == pytest.approx(0.0) and r.center[-1, 0] == pytest.approx(100.0)
    np.testing.assert_allclose(r.width, 3.5)
    np.testing.assert_allclose(ln["1:0:-2"].center[:, 1], -5.0, atol=1e-12)
    np.testing.assert_allclose(ln["1:0:-2"].width, 3.0)
    left = ln["1:0:1"]  # left lane: travels against s
    np.testing.assert_allclose(left.center[:, 1], 1.75, atol=1e-12)
    assert left.center[0, 0] == pytest.approx(100.0) and left.center[-1, 0] == pytest.approx(0.0)
    poly = r.polygon
    assert poly[:, 1].min() == pytest.approx(-3.5) and poly[:, 1].max() == pytest.approx(0.0)
    # speeds: lane record (30 km/h) over the road type (50 km/h)
    assert ln["1:0:-2"].speed == pytest.approx(30 / 3.6) and r.speed == pytest.approx(50 / 3.6)
    # road edges at the outer border of the outermost road-surface lane (sidewalks are outside)
    edge_ys = sorted(float(e[0, 1]) for e in odr.edges if abs(e[0, 0]) < 1e-9 and np.ptp(e[:, 1]) < 1e-9)
    assert edge_ys == pytest.approx([-6.5, 3.5])
    mark_ys = sorted(float(b[0, 1]) for b in odr.boundaries if abs(b[0, 0]) < 1e-9 and np.ptp(b[:, 1]) < 1e-9)
    assert mark_ys == pytest.approx([-3.5, 0.0])  # the broken line after lane -1 and the centre line


def test_arc_road_is_a_circle(odr):
    ln = lanes(odr)
    centre = np.array([100.0, 100.0])  # start (100, 0) heading +x, curvature +0.01 (left turn)
    np.testing.assert_allclose(np.linalg.norm(ln["2:0:-1"].center - centre, axis=1), 101.75, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(ln["2:0:1"].center - centre, axis=1), 98.25, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(ln["2:0:-2"].center - centre, axis=1), 105.0, atol=1e-9)
    end = ln["2:0:-1"].center[-1]
    np.testing.assert_allclose(end, centre + 101.75 * np.array([math.sin(0.5), -math.cos(0.5)]), atol=1e-9)


def test_clothoid_road_follows_the_integrated_reference_line(odr):
    ln = lanes(odr)
    x0, y0 = 100 + 100 * math.sin(0.5), 100 - 100 * math.cos(0.5)
    nx, ny, nh = numeric_clothoid(x0, y0, 0.5, 0.01, 0.0, 40.0)
    assert nh[-1] == pytest.approx(0.7)
    normal = np.array([-math.sin(0.7), math.cos(0.7)])
    np.testing.assert_allclose(ln["3:0:-1"].center[-1], [nx[-1], ny[-1]] - 1.75 * normal, atol=1e-6)
    # the clothoid starts where the arc ends: lanes join without a gap
    np.testing.assert_allclose(ln["3:0:-1"].center[0], ln["2:0:-1"].center[-1], atol=1e-9)


def test_lane_graph_follows_the_direction_of_travel(odr):
    links = set(odr.links)
    for a, b in (
        ("1:0:-1", "2:0:-1"),
        ("2:0:-1", "3:0:-1"),
        ("1:0:-2", "2:0:-2"),
        ("2:0:-2", "3:0:-2"),
        ("3:0:1", "2:0:1"),
        ("2:0:1", "1:0:1"),
    ):
        assert (a, b, LinkKind.SUCCESSOR) in links
    assert ("2:0:-1", "1:0:-1", LinkKind.SUCCESSOR) not in links
    assert ("1:0:-2", "1:0:-1", LinkKind.LEFT_NEIGHBOR) in links
    assert ("1:0:-1", "1:0:-2", LinkKind.RIGHT_NEIGHBOR) in links
    assert not any(
        k == LinkKind.LEFT_NEIGHBOR and "1:0:1" in (a, b) and "1:0:-1" in (a, b) for a, b, k in links
    )


def road(
    body: str, attrs: str = 'length="20" id="1" junction="-1"', geometry: str = "<line/>", hdg: float = 0.0
) -> str:
    return (
        f'<road {attrs}><planView><geometry s="0" x="0" y="0" hdg="{hdg}" length="20">{geometry}</geometry>'
        f"</planView><lanes>{body}</lanes></road>"
    )


def doc(*roads: str, extra: str = "") -> str:
    return "<OpenDRIVE><header/>" + "".join(roads) + extra + "</OpenDRIVE>"


RIGHT_LANE = (
    '<laneSection s="0"><center><lane id="0" type="none"/></center><right>'
    '<lane id="-1" type="driving">{link}<width sOffset="0" a="{a}" b="{b}" c="0" d="0"/></lane>'
    "</right></laneSection>"
)


def test_lane_offset_and_a_widening_lane():
    body = '<laneOffset s="0" a="0.5" b="0" c="0" d="0"/>' + RIGHT_LANE.format(link="", a=3.0, b=0.05)
    m = parse_opendrive(doc(road(body)))
    lane = m.lanes[0]
    s = lane.center[:, 0]
    np.testing.assert_allclose(lane.width, 3.0 + 0.05 * s, atol=1e-12)
    np.testing.assert_allclose(lane.center[:, 1], 0.5 - 0.5 * (3.0 + 0.05 * s), atol=1e-12)


def test_poly3_and_param_poly3_geometry():
    # paramPoly3 of a straight line along +y (normalized p): u = 0, v = 20 p
    pp = '<paramPoly3 aU="0" bU="0" cU="0" dU="0" aV="0" bV="20" cV="0" dV="0" pRange="normalized"/>'
    m = parse_opendrive(doc(road(RIGHT_LANE.format(link="", a=2.0, b=0), geometry=pp)))
    c = m.lanes[0].center  # right of a +y reference line is +x
    np.testing.assert_allclose(c[:, 0], 1.0, atol=1e-9)
    assert c[0, 1] == pytest.approx(0.0, abs=1e-9) and c[-1, 1] == pytest.approx(20.0, abs=1e-6)
    # poly3 v = 0.01 u^2: arc length 20 reaches u where integral sqrt(1 + (0.02 u)^2) = 20
    m = parse_opendrive(
        doc(road(RIGHT_LANE.format(link="", a=2.0, b=0), geometry='<poly3 a="0" b="0" c="0.01" d="0"/>'))
    )
    u = np.linspace(0, 25, 250_001)
    arc = np.concatenate([[0], np.cumsum(np.hypot(np.diff(u), np.diff(0.01 * u * u)))])
    u_end = np.interp(20.0, arc, u)
    h_end = math.atan(0.02 * u_end)
    ref_end = np.array([u_end, 0.01 * u_end**2])
    expected = ref_end + 1.0 * np.array([math.sin(h_end), -math.cos(h_end)])
    np.testing.assert_allclose(m.lanes[0].center[-1], expected, atol=1e-3)


def test_junction_connections_link_incoming_and_connecting_roads():
    sec = RIGHT_LANE.format(link='<link><predecessor id="-1"/><successor id="-1"/></link>', a=3.5, b=0)
    r10 = road(sec, 'length="20" id="10" junction="-1"').replace(
        "<planView>", '<link><successor elementType="junction" elementId="100"/></link><planView>'
    )
    r11 = (
        road(sec, 'length="20" id="11" junction="100"')
        .replace('x="0"', 'x="20"')
        .replace(
            "<planView>",
            '<link><predecessor elementType="road" elementId="10" contactPoint="end"/>'
            '<successor elementType="road" elementId="12" contactPoint="start"/></link><planView>',
        )
    )
    r12 = (
        road(sec, 'length="20" id="12" junction="-1"')
        .replace('x="0"', 'x="40"')
        .replace("<planView>", '<link><predecessor elementType="junction" elementId="100"/></link><planView>')
    )
    junction = (
        '<junction id="100"><connection id="0" incomingRoad="10" connectingRoad="11" contactPoint="start">'
        '<laneLink from="-1" to="-1"/></connection></junction>'
    )
    m = parse_opendrive(doc(r10, r11, r12, extra=junction))
    succ = {(a, b) for a, b, k in m.links if k == LinkKind.SUCCESSOR}
    assert succ == {("10:0:-1", "11:0:-1"), ("11:0:-1", "12:0:-1")}
    # no road edges inside the junction: only roads 10 and 12 have a right edge
    assert sorted(round(float(e[0, 0])) for e in m.edges) == [0, 40]


def test_left_hand_traffic_reverses_directions():
    body = (
        '<laneSection s="0"><left><lane id="1" type="driving"><width sOffset="0" a="3" b="0" c="0" d="0"/>'
        '</lane></left><center><lane id="0" type="none"/></center></laneSection>'
    )
    m = parse_opendrive(doc(road(body, 'length="20" id="1" junction="-1" rule="LHT"')))
    assert m.lanes[0].center[0, 0] == pytest.approx(0.0) and m.lanes[0].center[-1, 0] == pytest.approx(20.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("<OpenDRIVE><road", "not valid XML"),
        ("<Other/>", "root element is <Other>"),
        (
            doc(
                '<road length="20" id="7"><planView>'
                '<geometry s="0" x="0" y="0" hdg="0" length="20"><arc/></geometry>'
                "</planView><lanes/></road>"
            ),
            "road '7': <arc> has no attribute 'curvature'",
        ),
        (doc(road(RIGHT_LANE.format(link="", a="wide", b=0))), "<width a='wide'> is not a number"),
        (doc('<road length="20" id="8"><lanes/></road>'), "road '8': no <planView>"),
    ],
)
def test_malformed_opendrive_is_reported(text, message):
    with pytest.raises(SceneError, match=message):
        parse_opendrive(text, "bad.xodr")


def test_border_lanes_are_reported_unsupported():
    body = (
        '<laneSection s="0"><center><lane id="0" type="none"/></center><right><lane id="-1" type="driving">'
        '<border sOffset="0" a="3" b="0" c="0" d="0"/></lane></right></laneSection>'
    )
    m = parse_opendrive(doc(road(body)))
    assert m.lanes == [] and any("border" in w for w in m.warnings)
