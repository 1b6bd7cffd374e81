"""OpenDRIVE (``.xodr``) -> lane centre lines with widths, lane polygons, road edges, painted lines and
the lane graph, in the map's own frame (2-D; elevation and superelevation are ignored).

Supported: ``planView`` geometry ``line``, ``arc``, ``spiral`` (Euler spiral / clothoid, via Fresnel
integrals), ``poly3`` and ``paramPoly3`` (``arcLength`` or ``normalized``); ``laneOffset``; lane
sections with left / right lanes and cubic ``width`` records; road and lane ``speed`` records;
lane, road and junction links; ``rule="LHT"`` roads. Lanes given by ``border`` records instead of
``width`` are not supported (reported and skipped).

What becomes what:

- lanes of a driving type (:data:`DRIVING_TYPES`) -> ``LANE`` centre lines in the direction of
  travel (right lanes follow the reference line in right-hand traffic), with per-vertex widths,
  and ``LANE`` polygons (their borders);
- on roads outside junctions, the outer border of the outermost lane on each side whose type is
  road surface (anything but :data:`NON_ROAD_TYPES`) -> ``ROAD_EDGE``;
- borders carrying a ``roadMark`` other than ``none`` -> ``LANE_BOUNDARY``;
- successor links between lane ends that the file connects (lane links inside a road, road links,
  junction connections), oriented by the direction of travel; neighbours within a lane section.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np
from scipy.special import fresnel

from envs.drivesim.scene import LinkKind, SceneError

DRIVING_TYPES = frozenset({
    "driving", "entry", "exit", "onramp", "offramp", "connectingramp", "bidirectional", "sliplane",
    "mwyentry", "mwyexit",
})
"""Lane types a car drives in (compared lower-case)."""
NON_ROAD_TYPES = frozenset({"sidewalk", "walking", "border", "curb", "median", "none"})
"""Lane types that are not road surface: the road edge lies inside them."""
SAMPLE_STEP_M = 0.5
"""Spacing of the samples along each road's reference line."""
_SPEED_UNITS = {"m/s": 1.0, "km/h": 1 / 3.6, "mph": 0.44704}


@dataclass
class OdrLane:
    key: str
    """``"<road>:<section>:<lane id>"``."""
    center: np.ndarray
    """``[P, 2]`` centre line in the direction of travel."""
    width: np.ndarray
    """``[P]`` lane width (m)."""
    polygon: np.ndarray
    """``[Q, 2]`` outline (inner border then outer border reversed)."""
    speed: float
    """Speed limit (m/s), NaN when unknown."""


@dataclass
class OdrMap:
    """A parsed OpenDRIVE map."""

    lanes: list[OdrLane] = field(default_factory=list)
    edges: list[np.ndarray] = field(default_factory=list)
    """Road edges ``[P, 2]``."""
    boundaries: list[np.ndarray] = field(default_factory=list)
    """Painted lines ``[P, 2]``."""
    links: list[tuple[str, str, LinkKind]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---- reference line geometry -------------------------------------------------------------------
def _poly(coef: tuple[float, float, float, float], x: np.ndarray) -> np.ndarray:
    a, b, c, d = coef
    return a + x * (b + x * (c + x * d))


def eval_line(x0: float, y0: float, h0: float, u: np.ndarray):
    return x0 + u * math.cos(h0), y0 + u * math.sin(h0), np.full_like(u, h0)


def eval_arc(x0: float, y0: float, h0: float, k: float, u: np.ndarray):
    if abs(k) < 1e-12:
        return eval_line(x0, y0, h0, u)
    h = h0 + k * u
    return x0 + (np.sin(h) - math.sin(h0)) / k, y0 - (np.cos(h) - math.cos(h0)) / k, h


def eval_spiral(x0: float, y0: float, h0: float, k0: float, k1: float, length: float, u: np.ndarray):
    """Euler spiral: curvature varies linearly from ``k0`` to ``k1`` over ``length``.

    With ``c = (k1 - k0) / length`` the heading is ``h0 + k0 u + c u^2 / 2``. Completing the square,
    ``w = u + k0 / c`` and ``t = w / sqrt(pi / |c|)`` turn the position integral into Fresnel
    integrals: ``sqrt(pi / |c|) e^{i phi0} [C(t) - C(t0) + i sign(c) (S(t) - S(t0))]`` with
    ``phi0 = h0 - k0^2 / (2 c)``."""
    c = (k1 - k0) / length if length > 0 else 0.0
    if abs(c) < 1e-12:
        return eval_arc(x0, y0, h0, k0, u)
    a = math.sqrt(math.pi / abs(c))
    sign = 1.0 if c > 0 else -1.0
    phi0 = h0 - k0 * k0 / (2 * c)
    t0 = (k0 / c) / a
    t = (u + k0 / c) / a
    s_t, c_t = fresnel(t)
    s_0, c_0 = fresnel(t0)
    re, im = c_t - c_0, sign * (s_t - s_0)
    cp, sp = math.cos(phi0), math.sin(phi0)
    x = x0 + a * (re * cp - im * sp)
    y = y0 + a * (re * sp + im * cp)
    return x, y, h0 + k0 * u + 0.5 * c * u * u


def _eval_param(x0: float, y0: float, h0: float, uf, vf, dudp, dvdp, p_max: float, u: np.ndarray):
    """A curve given in local (u, v) coordinates by parameter p, evaluated at arc lengths ``u``."""
    n = max(200, int(p_max * 20) if p_max > 1.0 else 2000)
    p = np.linspace(0.0, p_max, n)
    lu, lv = uf(p), vf(p)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(lu), np.diff(lv)))])
    pu = np.interp(u, arc, p)
    lu, lv = uf(pu), vf(pu)
    hdg = h0 + np.arctan2(dvdp(pu), dudp(pu))
    c, s = math.cos(h0), math.sin(h0)
    return x0 + lu * c - lv * s, y0 + lu * s + lv * c, hdg


@dataclass
class _Geometry:
    s: float
    x: float
    y: float
    hdg: float
    length: float
    kind: str
    params: dict

    def evaluate(self, s: np.ndarray):
        u = np.clip(s - self.s, 0.0, self.length)
        p = self.params
        if self.kind == "line":
            return eval_line(self.x, self.y, self.hdg, u)
        if self.kind == "arc":
            return eval_arc(self.x, self.y, self.hdg, p["curvature"], u)
        if self.kind == "spiral":
            return eval_spiral(self.x, self.y, self.hdg, p["curvStart"], p["curvEnd"], self.length, u)
        if self.kind == "poly3":
            coef = (p["a"], p["b"], p["c"], p["d"])
            dcoef = (p["b"], 2 * p["c"], 3 * p["d"], 0.0)
            return _eval_param(self.x, self.y, self.hdg, lambda q: q, lambda q: _poly(coef, q),
                               lambda q: np.ones_like(q), lambda q: _poly(dcoef, q), self.length, u)
        if self.kind == "paramPoly3":
            cu = (p["aU"], p["bU"], p["cU"], p["dU"])
            cv = (p["aV"], p["bV"], p["cV"], p["dV"])
            du = (p["bU"], 2 * p["cU"], 3 * p["dU"], 0.0)
            dv = (p["bV"], 2 * p["cV"], 3 * p["dV"], 0.0)
            p_max = 1.0 if p.get("pRange", "arcLength") == "normalized" else self.length
            return _eval_param(self.x, self.y, self.hdg, lambda q: _poly(cu, q), lambda q: _poly(cv, q),
                               lambda q: _poly(du, q), lambda q: _poly(dv, q), p_max, u)
        raise SceneError(f"unsupported geometry {self.kind!r}")


def _f(el: ET.Element, name: str, where: str, default: float | None = None) -> float:
    raw = el.get(name)
    if raw is None:
        if default is not None:
            return default
        raise SceneError(f"{where}: <{el.tag}> has no attribute {name!r}")
    try:
        value = float(raw)
    except ValueError:
        raise SceneError(f"{where}: <{el.tag} {name}={raw!r}> is not a number") from None
    if not math.isfinite(value):
        raise SceneError(f"{where}: <{el.tag} {name}={raw!r}> is not finite")
    return value


def _geometries(road: ET.Element, where: str) -> list[_Geometry]:
    plan = road.find("planView")
    if plan is None:
        raise SceneError(f"{where}: no <planView>")
    out = []
    for g in plan.findall("geometry"):
        kinds = [c for c in g if c.tag in ("line", "arc", "spiral", "poly3", "paramPoly3")]
        if not kinds:
            raise SceneError(f"{where}: <geometry s={g.get('s')}> has no line/arc/spiral/poly3/paramPoly3")
        k = kinds[0]
        params: dict = {}
        if k.tag == "arc":
            params["curvature"] = _f(k, "curvature", where)
        elif k.tag == "spiral":
            params["curvStart"], params["curvEnd"] = _f(k, "curvStart", where), _f(k, "curvEnd", where)
        elif k.tag == "poly3":
            params = {n: _f(k, n, where) for n in "abcd"}
        elif k.tag == "paramPoly3":
            params = {n: _f(k, n, where) for n in ("aU", "bU", "cU", "dU", "aV", "bV", "cV", "dV")}
            params["pRange"] = k.get("pRange", "arcLength")
        out.append(_Geometry(_f(g, "s", where), _f(g, "x", where), _f(g, "y", where), _f(g, "hdg", where),
                             _f(g, "length", where), k.tag, params))
    if not out:
        raise SceneError(f"{where}: <planView> has no <geometry>")
    out.sort(key=lambda g: g.s)
    return out


def reference_line(geoms: list[_Geometry], s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x, y, hdg`` of the reference line at arc lengths ``s``."""
    starts = np.array([g.s for g in geoms])
    which = np.clip(np.searchsorted(starts, s, side="right") - 1, 0, len(geoms) - 1)
    x, y, h = np.zeros_like(s), np.zeros_like(s), np.zeros_like(s)
    for i, g in enumerate(geoms):
        m = which == i
        if m.any():
            x[m], y[m], h[m] = g.evaluate(s[m])
    return x, y, h


def _records(parent: ET.Element | None, tag: str, key: str, where: str) -> list[tuple[float, tuple]]:
    """Sorted ``(start, (a, b, c, d))`` polynomial records (width, laneOffset)."""
    if parent is None:
        return []
    recs = [(_f(r, key, where), tuple(_f(r, n, where, 0.0) for n in "abcd")) for r in parent.findall(tag)]
    return sorted(recs, key=lambda r: r[0])


def _piecewise(recs: list[tuple[float, tuple]], x: np.ndarray) -> np.ndarray:
    if not recs:
        return np.zeros_like(x)
    starts = np.array([r[0] for r in recs])
    which = np.clip(np.searchsorted(starts, x, side="right") - 1, 0, len(recs) - 1)
    out = np.zeros_like(x)
    for i, (s0, coef) in enumerate(recs):
        m = which == i
        out[m] = _poly(coef, x[m] - s0)
    return out


def _speed(el: ET.Element | None) -> float:
    if el is None:
        return math.nan
    try:
        return float(el.get("max", "nan")) * _SPEED_UNITS.get(el.get("unit", "m/s"), 1.0)
    except ValueError:
        return math.nan


# ---- parsing -----------------------------------------------------------------------------------
@dataclass
class _RoadInfo:
    id: str
    sections: list[list[int]]                   # lane ids per section
    forward: dict[tuple[int, int], bool]        # (section, lane id) -> travels along +s
    successor: tuple[str, str, str] | None      # (elementType, elementId, contactPoint)
    predecessor: tuple[str, str, str] | None


def parse_opendrive(text: str | bytes, where: str = "map.xodr", step: float = SAMPLE_STEP_M) -> OdrMap:
    """Parse an OpenDRIVE document (raises SceneError naming the road on malformed input)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise SceneError(f"{where}: not valid XML ({e})") from None
    if root.tag != "OpenDRIVE":
        raise SceneError(f"{where}: root element is <{root.tag}>, expected <OpenDRIVE>")
    out = OdrMap()
    roads: dict[str, _RoadInfo] = {}
    pairs: set[tuple[tuple[str, str], tuple[str, str]]] = set()   # ((key, end), (key, end))
    lane_links: list[tuple[str, int, int, str, int]] = []  # (road, section, lane, "succ" | "pred", target)
    for road in root.findall("road"):
        rid = road.get("id")
        w = f"{where}: road {rid!r}"
        if rid is None:
            raise SceneError(f"{where}: a <road> without an id")
        info = _parse_road(road, rid, w, step, out, lane_links)
        roads[rid] = info

    def key(road: str, sec: int, lane: int) -> str:
        return f"{road}:{sec}:{lane}"

    def section_at(info: _RoadInfo, contact: str) -> int:
        return 0 if contact == "start" else len(info.sections) - 1

    # lane links: inside a road (next / previous section) or to the linked road
    for rid, sec, lane, direction, target in lane_links:
        info = roads[rid]
        last = len(info.sections) - 1
        end = "end" if direction == "succ" else "start"
        if (direction == "succ" and sec < last) or (direction == "pred" and sec > 0):
            nsec = sec + 1 if direction == "succ" else sec - 1
            other_end = "start" if direction == "succ" else "end"
            pairs.add(((key(rid, sec, lane), end), (key(rid, nsec, target), other_end)))
            continue
        link = info.successor if direction == "succ" else info.predecessor
        if link is None or link[0] != "road" or link[1] not in roads:
            continue  # junction targets come from the junction's connections below
        other = roads[link[1]]
        contact = link[2] or "start"
        pairs.add(((key(rid, sec, lane), end), (key(link[1], section_at(other, contact), target), contact)))

    # junction connections: incoming road's lane -> connecting road's lane at contactPoint
    for junction in root.findall("junction"):
        jid = junction.get("id")
        for conn in junction.findall("connection"):
            inc, con = conn.get("incomingRoad"), conn.get("connectingRoad")
            contact = conn.get("contactPoint", "start")
            if inc not in roads or con not in roads:
                out.warnings.append(f"junction {jid}: connection to unknown road {inc!r} / {con!r} ignored")
                continue
            ri, rc = roads[inc], roads[con]
            if ri.successor and ri.successor[0] == "junction" and ri.successor[1] == jid:
                inc_end, inc_sec = "end", len(ri.sections) - 1
            elif ri.predecessor and ri.predecessor[0] == "junction" and ri.predecessor[1] == jid:
                inc_end, inc_sec = "start", 0
            else:
                out.warnings.append(f"junction {jid}: road {inc} does not link to it; connection ignored")
                continue
            for ll in conn.findall("laneLink"):
                try:
                    a, b = int(ll.get("from", "")), int(ll.get("to", ""))
                except ValueError:
                    out.warnings.append(f"junction {jid}: laneLink without integer from/to ignored")
                    continue
                pairs.add(((key(inc, inc_sec, a), inc_end), (key(con, section_at(rc, contact), b), contact)))

    # orient by travel direction: A -> B when A's exit end meets B's entry end
    lane_keys = {ln.key for ln in out.lanes}
    forward: dict[str, bool] = {}
    for rid, info in roads.items():
        for (sec, lane), fwd in info.forward.items():
            forward[key(rid, sec, lane)] = fwd
    links: set[tuple[str, str, LinkKind]] = set()
    for (ka, ea), (kb, eb) in pairs:
        if ka not in lane_keys or kb not in lane_keys:
            continue
        exit_a = "end" if forward[ka] else "start"
        exit_b = "end" if forward[kb] else "start"
        if ea == exit_a and eb != exit_b:
            links.add((ka, kb, LinkKind.SUCCESSOR))
        elif eb == exit_b and ea != exit_a:
            links.add((kb, ka, LinkKind.SUCCESSOR))
    out.links.extend(sorted(links))
    return out


def _parse_road(road: ET.Element, rid: str, w: str, step: float, out: OdrMap,
                lane_links: list) -> _RoadInfo:
    length = _f(road, "length", w)
    if length <= 0:
        raise SceneError(f"{w}: length must be > 0, got {length}")
    geoms = _geometries(road, w)
    lanes_el = road.find("lanes")
    if lanes_el is None:
        raise SceneError(f"{w}: no <lanes>")
    lht = road.get("rule", "RHT").upper() == "LHT"
    in_junction = road.get("junction", "-1") not in ("-1", "")
    road_speed = math.nan
    for t in road.findall("type"):
        road_speed = _speed(t.find("speed"))
        break

    def link_of(tag: str):
        el = road.find(f"link/{tag}")
        if el is None:
            return None
        return el.get("elementType", "road"), el.get("elementId", ""), el.get("contactPoint", "")

    offsets = _records(lanes_el, "laneOffset", "s", w)
    sections = sorted(lanes_el.findall("laneSection"), key=lambda e: _f(e, "s", w))
    if not sections:
        raise SceneError(f"{w}: no <laneSection>")
    info = _RoadInfo(rid, [], {}, link_of("successor"), link_of("predecessor"))
    sec_starts = [_f(e, "s", w) for e in sections]
    for si, sec in enumerate(sections):
        s0 = sec_starts[si]
        s1 = sec_starts[si + 1] if si + 1 < len(sections) else length
        if s1 - s0 < 1e-6:
            info.sections.append([])
            continue
        n = max(2, int(math.ceil((s1 - s0) / step)) + 1)
        s = np.linspace(s0, s1, n)
        x, y, h = reference_line(geoms, s)
        nx, ny = -np.sin(h), np.cos(h)
        t_base = _piecewise(offsets, s)
        ids_here: list[int] = []

        def point(t: np.ndarray, x=x, y=y, nx=nx, ny=ny) -> np.ndarray:
            return np.stack([x + t * nx, y + t * ny], -1)

        centre_lane = sec.find("center/lane")
        if centre_lane is not None and _has_mark(centre_lane):
            out.boundaries.append(point(t_base))
        for side, sign in (("left", 1.0), ("right", -1.0)):
            side_el = sec.find(side)
            if side_el is None:
                continue
            lanes = sorted(side_el.findall("lane"), key=lambda e: abs(int(e.get("id", "0"))))
            inner = t_base.copy()
            outer_road = t_base.copy()  # outer border of the outermost road-surface lane so far
            for lane in lanes:
                lid = int(lane.get("id", "0"))
                lw = f"{w} section {si} lane {lid}"
                ltype = lane.get("type", "none").lower()
                widths = _records(lane, "width", "sOffset", lw)
                if not widths and lane.find("border") is not None:
                    out.warnings.append(f"{lw}: <border> lanes are not supported; lane skipped")
                    continue
                wv = np.maximum(_piecewise(widths, s - s0), 0.0)
                outer = inner + sign * wv
                ids_here.append(lid)
                forward = (lid < 0) != lht
                info.forward[(si, lid)] = forward
                if ltype not in NON_ROAD_TYPES:
                    outer_road = outer
                if ltype in DRIVING_TYPES and wv.max() >= 0.3:
                    centre = point(0.5 * (inner + outer))
                    width = np.maximum(wv, 0.01)
                    poly = np.concatenate([point(inner), point(outer)[::-1]])
                    if not forward:
                        centre, width = centre[::-1], width[::-1]
                    speed = _speed(lane.find("speed"))
                    out.lanes.append(OdrLane(f"{rid}:{si}:{lid}", centre, width, poly,
                                             speed if math.isfinite(speed) else road_speed))
                if _has_mark(lane):
                    out.boundaries.append(point(outer))
                for tag, direction in (("successor", "succ"), ("predecessor", "pred")):
                    for el in lane.findall(f"link/{tag}"):
                        try:
                            lane_links.append((rid, si, lid, direction, int(el.get("id", ""))))
                        except ValueError:
                            out.warnings.append(f"{lw}: <{tag}> without an integer id ignored")
                inner = outer
            if not in_junction and lanes:
                out.edges.append(point(outer_road))
        for a, b in _neighbours(ids_here, lht):
            out.links.append((f"{rid}:{si}:{a}", f"{rid}:{si}:{b}", LinkKind.LEFT_NEIGHBOR))
            out.links.append((f"{rid}:{si}:{b}", f"{rid}:{si}:{a}", LinkKind.RIGHT_NEIGHBOR))
        info.sections.append(ids_here)
    return info


def _has_mark(lane: ET.Element) -> bool:
    return any(m.get("type", "none").lower() != "none" for m in lane.findall("roadMark"))


def _neighbours(ids: list[int], lht: bool) -> list[tuple[int, int]]:
    """(b, a) pairs meaning "a is the left neighbour of b", for adjacent lanes on the same side.

    In right-hand traffic the lane nearer the centre lane (smaller |id|) is on the left in the
    direction of travel, on both sides; in left-hand traffic it is on the right."""
    pairs = []
    for lid in ids:
        nxt = lid + (1 if lid > 0 else -1)
        if nxt in ids:
            inner, outer = lid, nxt
            pairs.append((outer, inner) if not lht else (inner, outer))
    return pairs
