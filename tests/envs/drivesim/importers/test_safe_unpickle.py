"""The restricted unpickler: real ScenarioNet content loads, anything that could run code is refused."""

from __future__ import annotations

import os
import pickle
import subprocess

import numpy as np
import pytest

from envs.drivesim.importers.safe_unpickle import UnsafePickleError, safe_load, safe_loads
from envs.drivesim.scene import SceneError


class _Reduce:
    """Pickles as ``func(*args)``: the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_builtins_numpy_and_sets_round_trip(protocol):
    data = {
        "a": np.arange(6, dtype=np.float64).reshape(3, 2),
        "valid": np.array([True, False]),
        "s": {"VEHICLE", "PEDESTRIAN"},
        "f": frozenset({1}),
        "n": None,
        "t": (1, 2.5, "x"),
        "scalar": np.float64(2.5),
        "i": np.int64(7),
        "u": np.array(["a", "bc"]),
    }
    out = safe_loads(pickle.dumps(data, protocol=protocol))
    np.testing.assert_array_equal(out["a"], data["a"])
    assert out["a"].dtype == np.float64 and out["valid"].dtype == bool
    assert out["s"] == {"VEHICLE", "PEDESTRIAN"} and out["f"] == frozenset({1})
    assert out["scalar"] == 2.5 and out["i"] == 7 and out["t"] == (1, 2.5, "x")
    assert out["u"].tolist() == ["a", "bc"]


def test_numpy_1x_module_path_is_admitted():
    # ScenarioNet files written under numpy 1.x name numpy.core.multiarray._reconstruct (protocol 4:
    # a length-prefixed name; protocol 2: a newline-terminated one)
    arr = np.array([1.0, 2.0])
    p4 = pickle.dumps(arr, protocol=4)
    assert b"\x8c\x16numpy._core.multiarray" in p4
    old4 = bytearray(p4.replace(b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"))
    assert old4[2] == pickle.FRAME[0]  # one frame: its 8-byte length shrinks by the removed byte
    old4[3:11] = (int.from_bytes(old4[3:11], "little") - 1).to_bytes(8, "little")
    np.testing.assert_array_equal(safe_loads(bytes(old4)), arr)
    old2 = pickle.dumps(arr, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct" in old2
    np.testing.assert_array_equal(safe_loads(old2), arr)


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda m: _Reduce(os.system, f"touch {m}"), f"{os.system.__module__}.system"),
        (lambda m: _Reduce(eval, f"open({str(m)!r}, 'w')"), "builtins.eval"),
        (lambda m: _Reduce(subprocess.Popen, ["touch", str(m)]), "subprocess.Popen"),
        (lambda m: _Reduce(getattr, "x", "upper"), "builtins.getattr"),
    ],
)
def test_code_running_pickles_are_refused_and_never_run(tmp_path, make, refused):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"id": "x", "tracks": {"a": make(marker)}}, protocol=4))
    with pytest.raises(UnsafePickleError) as err:
        safe_load(evil)
    msg = str(err.value)
    assert f"global '{refused}'" in msg and str(evil) in msg
    assert not marker.exists()


def test_truncated_and_garbage_pickles_raise_scene_error(tmp_path):
    good = pickle.dumps({"a": np.zeros(100)}, protocol=4)
    with pytest.raises(SceneError, match="truncated or corrupt"):
        safe_loads(good[: len(good) // 2], "half.pkl")
    with pytest.raises(SceneError, match="garbage.pkl: not a readable pickle"):
        safe_loads(b"this is not a pickle", "garbage.pkl")
