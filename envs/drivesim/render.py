"""Drawing scenes with Pillow + numpy: a PNG of a whole scene, top-down frames around the ego for
``env.render()`` and videos, and an mp4 writer (animated GIF when ffmpeg is missing).

Frames are world-aligned (x right, y up). The static map layer is drawn once per scene and scale and
cached (by scene id), so a frame is a crop of that layer plus a few agent polygons.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from envs.drivesim.scene import AgentType, LightState, MapType, PolygonType, Scene

BACKGROUND = (236, 238, 232)
ROAD = (196, 198, 204)
LANE_CENTRE = (170, 172, 182)
LANE_LINE = (255, 255, 255)
ROAD_EDGE = (70, 70, 76)
CROSSWALK = (246, 246, 246)
STOP_LINE = (200, 60, 60)
EGO = (220, 30, 40)
AGENT_COLOURS = {
    int(AgentType.VEHICLE): (45, 95, 200),
    int(AgentType.PEDESTRIAN): (235, 140, 20),
    int(AgentType.CYCLIST): (150, 60, 180),
}
OTHER_AGENT = (110, 110, 110)
LIGHT_COLOURS = {int(LightState.STOP): (225, 40, 40), int(LightState.CAUTION): (245, 185, 20),
                 int(LightState.GO): (40, 170, 70)}
PATH_COLOURS = {"plan": (0, 170, 230), "log": (250, 150, 0)}
OTHER_PATHS = ((20, 160, 120), (200, 0, 200), (120, 80, 0))
MAX_LAYER_PX = 8192
"""Map layers larger than this (per side) are not cached; frames then draw the map themselves."""
CACHE_SIZE = 8


class _View:
    """World (m) → pixel transform: ``u = (x - x0) * scale``, ``v = (y0 - y) * scale`` (y up)."""

    def __init__(self, x0: float, y0: float, scale: float):
        self.x0, self.y0, self.scale = x0, y0, scale

    def px(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.stack([(xy[:, 0] - self.x0) * self.scale, (self.y0 - xy[:, 1]) * self.scale], axis=1)

    def pts(self, xy: np.ndarray) -> list[tuple[float, float]]:
        return [tuple(p) for p in self.px(xy).tolist()]


def _box(centre: np.ndarray, yaw: float, length: float, width: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    f, lft = np.array([c, s]), np.array([-s, c])
    return np.stack([centre + length / 2 * f + width / 2 * lft, centre + length / 2 * f - width / 2 * lft,
                     centre - length / 2 * f - width / 2 * lft, centre - length / 2 * f + width / 2 * lft])


def _draw_map(draw: ImageDraw.ImageDraw, scene: Scene, view: _View, step: int | None = None) -> None:
    """Drivable lanes filled, lane centre lines, painted lines, crosswalks, stop lines, road edges."""
    sc = view.scale
    lanes = [i for i in range(scene.num_polylines) if scene.map_type[i] == MapType.LANE]
    # lanes without polygons (e.g. nuScenes connectors) are filled by their buffered centre line
    for i in lanes:
        pts = scene.polyline(i)
        if len(pts) < 2:
            continue
        widths = scene.map_width[scene.map_offsets[i]:scene.map_offsets[i + 1]]
        w = float(np.nanmean(widths)) if np.isfinite(widths).any() else 3.7
        draw.line(view.pts(pts), fill=ROAD, width=max(int(round(w * sc)), 1), joint="curve")
    for g in range(len(scene.polygon_offsets) - 1):
        if scene.polygon_type[g] == PolygonType.LANE:
            poly = scene.polygon(g)
            if len(poly) >= 3:
                draw.polygon(view.pts(poly), fill=ROAD)
    for g in range(len(scene.polygon_offsets) - 1):
        if scene.polygon_type[g] == PolygonType.CROSSWALK:
            poly = scene.polygon(g)
            if len(poly) >= 3:
                draw.polygon(view.pts(poly), fill=CROSSWALK, outline=LANE_CENTRE)
    line_w = max(int(round(0.15 * sc)), 1)
    tl_colour: dict[int, tuple[int, int, int]] = {}
    if step is not None and len(scene.tl_lane):
        for k, lane in enumerate(scene.tl_lane):
            tl_colour[int(lane)] = LIGHT_COLOURS.get(int(scene.tl_state[k, step]), LANE_CENTRE)
    for i in range(scene.num_polylines):
        pts = scene.polyline(i)
        if len(pts) < 2:
            continue
        kind = int(scene.map_type[i])
        if kind == MapType.LANE:
            draw.line(view.pts(pts), fill=tl_colour.get(i, LANE_CENTRE),
                      width=line_w * (2 if i in tl_colour else 1))
        elif kind == MapType.LANE_BOUNDARY:
            draw.line(view.pts(pts), fill=LANE_LINE, width=line_w)
        elif kind == MapType.STOP_LINE:
            draw.line(view.pts(pts), fill=STOP_LINE, width=2 * line_w)
        elif kind == MapType.CROSSWALK:
            draw.line(view.pts(pts), fill=LANE_CENTRE, width=line_w)
    for i in range(scene.num_polylines):
        if scene.map_type[i] == MapType.ROAD_EDGE and scene.map_offsets[i + 1] - scene.map_offsets[i] >= 2:
            draw.line(view.pts(scene.polyline(i)), fill=ROAD_EDGE, width=max(int(round(0.3 * sc)), 2))


def _draw_agent(draw: ImageDraw.ImageDraw, view: _View, centre: np.ndarray, yaw: float, size: np.ndarray,
                colour: tuple[int, int, int]) -> None:
    corners = _box(np.asarray(centre, dtype=np.float64), float(yaw), float(size[0]), float(size[1]))
    draw.polygon(view.pts(corners), fill=colour, outline=(20, 20, 20))
    nose = view.pts(np.stack([centre, (corners[0] + corners[1]) / 2]))
    draw.line(nose, fill=(255, 255, 255), width=1)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:          # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _scale_bar(draw: ImageDraw.ImageDraw, scale: float, size: int) -> None:
    """A bar of a round length (1, 2 or 5 × 10^k m) about a fifth of the image wide, bottom left."""
    target = size / 5 / scale
    k = 10 ** math.floor(math.log10(target))
    metres = max((m * k for m in (1, 2, 5) if m * k <= target), default=k)
    x0, y0 = size * 0.04, size * 0.95
    x1 = x0 + metres * scale
    draw.rectangle([x0, y0 - 4, x1, y0], fill=(20, 20, 20))
    label = f"{metres:g} m"
    draw.text((x0, y0 - 8 - size // 40), label, fill=(20, 20, 20), font=_font(max(size // 50, 10)))


def draw_scene_png(scene: Scene, path: str | os.PathLike, size: int = 1024, step: int | None = None) -> Path:
    """Draw the map, every agent's track (thin lines), the boxes at ``step`` (default 0) and the ego's
    log (red, thick) to a ``size`` x ``size`` PNG with a scale bar and the scene id. Returns the path."""
    if size < 64:
        raise ValueError(f"draw_scene_png: size must be ≥ 64 px, got {size}")
    step = 0 if step is None else int(step)
    if not 0 <= step < scene.num_steps:
        raise ValueError(f"draw_scene_png: step {step} out of range for scene {scene.scene_id!r} "
                         f"with {scene.num_steps} steps")
    pts = [scene.map_points.reshape(-1, 2), scene.agent_state[..., :2][scene.agent_valid]]
    allp = np.concatenate(pts) if sum(len(p) for p in pts) else np.zeros((1, 2))
    lo, hi = allp.min(0), allp.max(0)
    span = float(max(hi[0] - lo[0], hi[1] - lo[1], 10.0)) * 1.06
    centre = (lo + hi) / 2
    scale = size / span
    view = _View(centre[0] - span / 2, centre[1] + span / 2, scale)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    _draw_map(draw, scene, view, step)
    ego = scene.ego_index
    for i in range(scene.num_agents):
        if i == ego:
            continue
        track = scene.agent_state[i, scene.agent_valid[i], :2]
        colour = AGENT_COLOURS.get(int(scene.agent_type[i]), OTHER_AGENT)
        if len(track) >= 2:
            draw.line(view.pts(track), fill=tuple(int(0.5 * c + 0.5 * 255) for c in colour), width=1)
    ego_track = scene.agent_state[ego, scene.agent_valid[ego], :2]
    if len(ego_track) >= 2:
        draw.line(view.pts(ego_track), fill=EGO, width=max(3, size // 300))
    for i in range(scene.num_agents):
        if scene.agent_valid[i, step]:
            colour = EGO if i == ego else AGENT_COLOURS.get(int(scene.agent_type[i]), OTHER_AGENT)
            st = scene.agent_state[i, step]
            _draw_agent(draw, view, st[:2], st[2], scene.agent_size[i], colour)
    _scale_bar(draw, scale, size)
    font = _font(max(size // 45, 10))
    draw.text((size * 0.02, size * 0.015), f"{scene.scene_id}   step {step}/{scene.num_steps - 1}",
              fill=(20, 20, 20), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


# ---- frames ---------------------------------------------------------------------------------------
_LAYERS: OrderedDict[tuple, tuple[np.ndarray, _View]] = OrderedDict()


def _map_layer(scene: Scene, scale: float) -> tuple[np.ndarray, _View] | None:
    """The whole map drawn at ``scale`` px/m (cached per scene id, map size and scale), or None when
    it would be larger than MAX_LAYER_PX per side."""
    key = (scene.scene_id, len(scene.map_points), len(scene.polygon_points), round(scale, 6))
    if key in _LAYERS:
        _LAYERS.move_to_end(key)
        return _LAYERS[key]
    pts = scene.map_points.reshape(-1, 2)
    if not len(pts):
        pts = np.zeros((1, 2))
    margin = 10.0
    lo, hi = pts.min(0) - margin, pts.max(0) + margin
    w, h = int(math.ceil((hi[0] - lo[0]) * scale)), int(math.ceil((hi[1] - lo[1]) * scale))
    if max(w, h) > MAX_LAYER_PX:
        return None
    view = _View(lo[0], hi[1], scale)
    img = Image.new("RGB", (w, h), BACKGROUND)
    _draw_map(ImageDraw.Draw(img), scene, view)
    layer = (np.asarray(img).copy(), view)
    _LAYERS[key] = layer
    while len(_LAYERS) > CACHE_SIZE:
        _LAYERS.popitem(last=False)
    return layer


def _per_agent(values: np.ndarray | None, scene_values: np.ndarray, n: int, scene: Scene,
               name: str) -> np.ndarray:
    """Sizes / types of the ``n`` agents drawn: given, or the scene's (all agents, or all but the ego)."""
    if values is not None:
        values = np.asarray(values)
        if len(values) != n:
            raise ValueError(f"render_frame: {name} has {len(values)} rows for {n} agents")
        return values
    if n == scene.num_agents:
        return scene_values
    if n == scene.num_agents - 1:
        return np.delete(scene_values, scene.ego_index, axis=0)
    raise ValueError(f"render_frame: pass {name} for {n} agents (scene {scene.scene_id!r} has "
                     f"{scene.num_agents})")


def render_frame(
    scene: Scene,
    ego_pose: np.ndarray,
    ego_size: np.ndarray,
    agent_state: np.ndarray,
    agent_valid: np.ndarray,
    view_center: np.ndarray | None = None,
    view_size_m: float = 80.0,
    px: int = 400,
    extra_paths: dict[str, np.ndarray] | None = None,
    agent_size: np.ndarray | None = None,
    agent_type: np.ndarray | None = None,
    pose_is_center: bool = False,
    rear_axle_to_center: float | None = None,
) -> np.ndarray:
    """A top-down RGB frame ``[px, px, 3]`` uint8 of ``view_size_m`` metres around ``view_center``.

    ``ego_pose`` (x, y, yaw) is the rear axle (or the box centre with ``pose_is_center``); the box
    centre sits ``rear_axle_to_center`` ahead (the scene's value, else 0.3 x length).
    ``agent_state [N, ≥3]`` box centres (x, y, heading) of the other agents drawn where
    ``agent_valid [N]``; their sizes / types default to the scene's (N = all agents or all but the
    ego). ``extra_paths``: name -> ``[K, 2]`` world points drawn as lines ("plan", "log" have fixed
    colours). ``view_center`` defaults to the ego box centre. World-aligned (x right, y up).
    """
    if px < 16:
        raise ValueError(f"render_frame: px must be ≥ 16, got {px}")
    if not view_size_m > 0:
        raise ValueError(f"render_frame: view_size_m must be > 0, got {view_size_m}")
    ego_pose = np.asarray(ego_pose, dtype=np.float64).reshape(-1)[:3]
    ego_size = np.asarray(ego_size, dtype=np.float64).reshape(-1)[:2]
    yaw = float(ego_pose[2])
    if pose_is_center:
        ego_centre = ego_pose[:2]
    else:
        d = rear_axle_to_center if rear_axle_to_center is not None else (
            scene.ego_rear_axle_to_center if scene.ego_rear_axle_to_center is not None else 0.3 * ego_size[0])
        ego_centre = ego_pose[:2] + d * np.array([math.cos(yaw), math.sin(yaw)])
    centre = ego_centre if view_center is None else np.asarray(view_center, dtype=np.float64).reshape(-1)[:2]
    scale = px / view_size_m
    x0, y0 = centre[0] - view_size_m / 2, centre[1] + view_size_m / 2
    layer = _map_layer(scene, scale)
    if layer is None:
        img = Image.new("RGB", (px, px), BACKGROUND)
        view = _View(x0, y0, scale)
        _draw_map(ImageDraw.Draw(img), scene, view)
    else:
        arr, lview = layer
        u0 = int(round((x0 - lview.x0) * scale))
        v0 = int(round((lview.y0 - y0) * scale))
        h, w = arr.shape[:2]
        if u0 >= 0 and v0 >= 0 and u0 + px <= w and v0 + px <= h:
            frame = arr[v0:v0 + px, u0:u0 + px].copy()
        else:
            frame = np.empty((px, px, 3), dtype=np.uint8)
            frame[:] = BACKGROUND
            su0, sv0, su1, sv1 = max(u0, 0), max(v0, 0), min(u0 + px, w), min(v0 + px, h)
            if su1 > su0 and sv1 > sv0:
                frame[sv0 - v0:sv1 - v0, su0 - u0:su1 - u0] = arr[sv0:sv1, su0:su1]
        img = Image.fromarray(frame)
        view = _View(lview.x0 + u0 / scale, lview.y0 - v0 / scale, scale)
    draw = ImageDraw.Draw(img)
    for k, (name, path) in enumerate((extra_paths or {}).items()):
        path = np.asarray(path, dtype=np.float64).reshape(-1, 2)
        path = path[np.isfinite(path).all(1)]
        if len(path) >= 2:
            draw.line(view.pts(path), fill=PATH_COLOURS.get(name, OTHER_PATHS[k % len(OTHER_PATHS)]),
                      width=max(int(round(0.3 * scale)), 2))
    agent_state = np.asarray(agent_state, dtype=np.float64)
    agent_valid = np.asarray(agent_valid, dtype=bool).reshape(-1)
    n = len(agent_state)
    if n:
        sizes = _per_agent(agent_size, scene.agent_size, n, scene, "agent_size")
        types = _per_agent(agent_type, scene.agent_type, n, scene, "agent_type")
        reach = view_size_m * 0.75
        show = agent_valid & (np.abs(agent_state[:, 0] - centre[0]) < reach) & \
            (np.abs(agent_state[:, 1] - centre[1]) < reach)
        idx = np.nonzero(show)[0]
        if len(idx):
            st = agent_state[idx]
            c, s_ = np.cos(st[:, 2]), np.sin(st[:, 2])
            half_l, half_w = sizes[idx, 0, None] / 2, sizes[idx, 1, None] / 2
            f = np.stack([c, s_], 1)
            lft = np.stack([-s_, c], 1)
            box = np.stack([st[:, :2] + half_l * f + half_w * lft, st[:, :2] + half_l * f - half_w * lft,
                            st[:, :2] - half_l * f - half_w * lft, st[:, :2] - half_l * f + half_w * lft], 1)
            pix = view.px(box.reshape(-1, 2)).reshape(-1, 4, 2)
            nose = view.px(np.stack([st[:, :2], st[:, :2] + half_l * f], 1).reshape(-1, 2)).reshape(-1, 2, 2)
            for k, i in enumerate(idx):
                colour = AGENT_COLOURS.get(int(types[i]), OTHER_AGENT)
                draw.polygon([tuple(p) for p in pix[k].tolist()], fill=colour, outline=(20, 20, 20))
                draw.line([tuple(p) for p in nose[k].tolist()], fill=(255, 255, 255), width=1)
    _draw_agent(draw, view, ego_centre, yaw, ego_size, EGO)
    return np.asarray(img, dtype=np.uint8)


def write_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: int = 10) -> Path:
    """Write ``[H, W, 3]`` uint8 frames as an H.264 mp4 (imageio + its ffmpeg binary). Without
    ffmpeg, warn and write an animated GIF next to it (``.gif``). Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError) as e:
        gif = path.with_suffix(".gif")
        warnings.warn(f"write_mp4: ffmpeg unavailable ({e}); writing an animated GIF to {gif}", stacklevel=2)
        images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
        if not images:
            raise ValueError("write_mp4: no frames") from None
        images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return gif
    n = 0
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=2, quality=7,
                            ffmpeg_log_level="error") as writer:
        for f in frames:
            writer.append_data(np.asarray(f, dtype=np.uint8))  # type: ignore[attr-defined]
            n += 1
    if n == 0:
        path.unlink(missing_ok=True)
        raise ValueError("write_mp4: no frames")
    return path
