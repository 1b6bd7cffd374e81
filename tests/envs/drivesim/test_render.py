"""Scene PNGs, top-down frames and video writing."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from PIL import Image

from envs.drivesim import render
from envs.drivesim.generate import GeneratorConfig, generate_scene
from envs.drivesim.render import EGO, draw_scene_png, render_frame, write_mp4
from envs.drivesim.scene import AgentType, Scene


@pytest.fixture(scope="module")
def scene() -> Scene:
    return generate_scene(3, GeneratorConfig(layouts=("intersection",), num_agents=16))


def tiny_scene() -> Scene:
    """One straight 3.7 m lane along x from 0 to 40 m, the ego on it, one car ahead."""
    lane = np.stack([np.linspace(0, 40, 21), np.zeros(21)], 1).astype(np.float32)
    st = np.zeros((2, 5, 5), dtype=np.float32)
    st[0, :, 0] = 10 + np.arange(5)
    st[1, :, 0] = 25
    st[:, :, 3] = [[10.0], [0.0]]
    return Scene(
        scene_id="tiny", agent_state=st, agent_size=np.array([[4.5, 2.0], [4.5, 2.0]], dtype=np.float32),
        agent_valid=np.ones((2, 5), dtype=bool), agent_type=np.array([1, 1], dtype=np.int8), ego_index=0,
        map_points=lane, map_offsets=np.array([0, 21], dtype=np.int32), map_type=np.zeros(1, dtype=np.int8),
        map_width=np.full(21, 3.7, dtype=np.float32), lane_speed_limit=np.array([13.9], dtype=np.float32),
    ).validate()


def has_colour(img: np.ndarray, colour: tuple[int, int, int], tol: int = 0) -> np.ndarray:
    return (np.abs(img.astype(int) - np.array(colour)) <= tol).all(-1)


def test_draw_scene_png(tmp_path, scene: Scene) -> None:
    path = draw_scene_png(scene, tmp_path / "a" / "scene.png", size=512, step=30)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (512, 512, 3)
    assert has_colour(img, EGO).sum() > 50                  # the ego's log and box
    assert has_colour(img, render.ROAD).sum() > 2000         # drivable lanes filled
    assert has_colour(img, render.ROAD_EDGE).sum() > 200
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10
    with pytest.raises(ValueError, match="step 91 out of range"):
        draw_scene_png(scene, tmp_path / "b.png", step=91)
    with pytest.raises(ValueError, match="size"):
        draw_scene_png(scene, tmp_path / "b.png", size=10)


def test_draw_scene_png_tiny_scene_known_pixels(tmp_path) -> None:
    s = tiny_scene()
    img = np.asarray(Image.open(draw_scene_png(s, tmp_path / "t.png", size=256)).convert("RGB"))
    # the view spans the map (0..40 m) and the tracks, centred; the ego box at step 0 is centred on
    # x = 10 m, y = 0: find the ego colour there
    span = 40 * 1.06
    u = int((10 - (20 - span / 2)) / span * 256)
    assert has_colour(img[120:136, u - 3:u + 4], EGO).any()
    other = render.AGENT_COLOURS[int(AgentType.VEHICLE)]
    u2 = int((25 - (20 - span / 2)) / span * 256)
    assert has_colour(img[120:136, u2 - 3:u2 + 4], other).any()


def test_render_frame_shape_and_ego(scene: Scene) -> None:
    e = scene.ego_index
    others = np.delete(np.arange(scene.num_agents), e)
    t = 20
    st = scene.agent_state[e, t].astype(np.float64)
    d = scene.ego_rear_axle_to_center
    rear = np.array([st[0] - d * np.cos(st[2]), st[1] - d * np.sin(st[2]), st[2]])
    paths = {"log": scene.agent_state[e, :, :2], "plan": scene.agent_state[e, t:t + 20, :2]}
    frame = render_frame(scene, rear, scene.agent_size[e], scene.agent_state[others, t],
                         scene.agent_valid[others, t], px=200, extra_paths=paths)
    assert frame.shape == (200, 200, 3) and frame.dtype == np.uint8
    # the view is centred on the ego box: the ego colour is at the centre pixel
    assert has_colour(frame[95:106, 95:106], EGO).any()
    assert has_colour(frame, render.PATH_COLOURS["plan"]).any()
    # the same pose given as the box centre gives the same frame
    same = render_frame(scene, st[:3], scene.agent_size[e], scene.agent_state[others, t],
                        scene.agent_valid[others, t], px=200, pose_is_center=True, extra_paths=paths)
    assert np.array_equal(frame, same)


def test_render_frame_all_agents_and_errors(scene: Scene) -> None:
    e = scene.ego_index
    t = 0
    # all N agents (ego included) with the scene's sizes by default
    frame = render_frame(scene, scene.agent_state[e, t, :3], scene.agent_size[e], scene.agent_state[:, t],
                         scene.agent_valid[:, t], pose_is_center=True, px=128, view_size_m=60.0)
    assert frame.shape == (128, 128, 3)
    with pytest.raises(ValueError, match="agent_size"):
        render_frame(scene, scene.agent_state[e, t, :3], scene.agent_size[e], scene.agent_state[:3, t],
                     scene.agent_valid[:3, t])
    with pytest.raises(ValueError, match="agent_size has 2 rows for 3 agents"):
        render_frame(scene, scene.agent_state[e, t, :3], scene.agent_size[e], scene.agent_state[:3, t],
                     scene.agent_valid[:3, t], agent_size=np.ones((2, 2)), agent_type=np.ones(3))
    # far outside the map: background and the ego only
    far = render_frame(scene, np.array([1e4, 1e4, 0.0]), scene.agent_size[e], np.zeros((0, 5)),
                       np.zeros(0, bool), px=64)
    assert has_colour(far, render.BACKGROUND).mean() > 0.9 and has_colour(far, EGO).any()


def test_render_frame_caches_the_map_and_is_fast(scene: Scene, record_property) -> None:
    e = scene.ego_index
    others = np.delete(np.arange(scene.num_agents), e)
    render._LAYERS.clear()
    args = (scene, scene.agent_state[e, 0, :3], scene.agent_size[e])
    first = render_frame(*args, scene.agent_state[others, 0], scene.agent_valid[others, 0],
                         pose_is_center=True)
    assert len(render._LAYERS) == 1
    t0 = time.perf_counter()
    frames = [render_frame(*args, scene.agent_state[others, t], scene.agent_valid[others, t],
                           pose_is_center=True) for t in range(30)]
    per_frame = (time.perf_counter() - t0) / 30
    assert len(render._LAYERS) == 1 and np.array_equal(frames[0], first)
    record_property("render_frame_ms", round(per_frame * 1000, 2))
    print(f"\nrender_frame 400x400: {per_frame * 1000:.2f} ms per frame (map layer cached)")


def test_write_mp4(tmp_path) -> None:
    import imageio.v3 as iio

    frames = [np.full((64, 96, 3), 20 * k, dtype=np.uint8) for k in range(8)]
    path = write_mp4(iter(frames), tmp_path / "v" / "clip.mp4", fps=10)
    assert path.suffix == ".mp4" and path.stat().st_size > 0
    back = iio.imread(path, plugin="pyav") if _has_pyav() else iio.imread(path)
    assert len(back) == 8 and back.shape[1:] == (64, 96, 3)
    with pytest.raises(ValueError, match="no frames"):
        write_mp4([], tmp_path / "empty.mp4")


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def test_write_mp4_falls_back_to_gif(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imageio_ffmpeg

    def missing() -> str:
        raise RuntimeError("no ffmpeg here")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", missing)
    frames = [np.full((32, 32, 3), 40 * k, dtype=np.uint8) for k in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_mp4(frames, tmp_path / "clip.mp4")
    assert path.suffix == ".gif" and any("GIF" in str(w.message) for w in caught)
    gif = Image.open(path)
    assert gif.n_frames == 4
