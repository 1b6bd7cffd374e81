"""A restricted unpickler for ScenarioNet files: builtins and numpy arrays, nothing else.

A pickle is a program: ``pickle.load`` on an untrusted file can import and call anything
(``os.system``, ``builtins.eval``...). ScenarioNet's ScenarioDescription files are plain dicts of
builtins and numpy arrays, so the only globals a real file needs are numpy's array reconstruction.
The six real nuScenes-mini files (pickle protocol 4, written under numpy 1.x) reference exactly
``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``; Python sets in their
metadata are built by pickle opcodes and need no global. Everything admitted here only builds data:

- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (numpy 1.x / 2.x
  path), ``numpy.ndarray``, ``numpy.dtype``: array reconstruction (protocol <= 4).
- ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``: numpy scalars (``np.float64``
  values in metadata), rebuilt from their dtype and raw bytes.
- ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer``: arrays in protocol-5
  pickles (Python >= 3.14 writes protocol 5 by default), rebuilt from an in-band byte buffer.
- ``builtins.set`` / ``builtins.frozenset``: sets in protocol-2 pickles.
- ``_codecs.encode``: how protocol-2 pickles store ``bytes`` (array data); it only re-encodes a
  string.

Any other global is refused with :class:`UnsafePickleError`, naming it and the file. The elements
of object arrays are part of the same pickle stream, so they pass through the same ``find_class``.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from envs.drivesim.scene import SceneError


class UnsafePickleError(SceneError):
    """The pickle references a global outside the allow-list (it could run code when loaded)."""


def _numpy_attr(module: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; pickles name whichever path wrote them
    import importlib

    for candidate in (module, module.replace("numpy.core", "numpy._core"),
                      module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"{module}.{name}")


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {}
"""(module, name) -> the object find_class returns; filled lazily by :func:`_allowed`."""


def _allowed() -> dict[tuple[str, str], Any]:
    if not ALLOWED_GLOBALS:
        reconstruct = _numpy_attr("numpy._core.multiarray", "_reconstruct")
        scalar = _numpy_attr("numpy._core.multiarray", "scalar")
        frombuffer = _numpy_attr("numpy._core.numeric", "_frombuffer")
        for core in ("numpy.core", "numpy._core"):
            ALLOWED_GLOBALS[(f"{core}.multiarray", "_reconstruct")] = reconstruct
            ALLOWED_GLOBALS[(f"{core}.multiarray", "scalar")] = scalar
            ALLOWED_GLOBALS[(f"{core}.numeric", "_frombuffer")] = frombuffer
        ALLOWED_GLOBALS[("numpy", "ndarray")] = np.ndarray
        ALLOWED_GLOBALS[("numpy", "dtype")] = np.dtype
        for builtins in ("builtins", "__builtin__"):  # protocol 2 writes Python 2 names
            ALLOWED_GLOBALS[(builtins, "set")] = set
            ALLOWED_GLOBALS[(builtins, "frozenset")] = frozenset
        ALLOWED_GLOBALS[("_codecs", "encode")] = codecs.encode
    return ALLOWED_GLOBALS


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file: io.BufferedIOBase, where: str = "<bytes>"):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _allowed()[(module, name)]
        except KeyError:
            admitted = sorted(f"{m}.{n}" for m, n in _allowed())
            raise UnsafePickleError(
                f"{self.where}: refused to load global '{module}.{name}': a ScenarioNet scene holds only "
                f"builtins and numpy arrays, so this file may run code when unpickled. Admitted: {admitted}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.where}: persistent ids are not allowed in a scene pickle")


def safe_loads(data: bytes, where: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    Raises :class:`UnsafePickleError` for a refused global and :class:`SceneError` for a truncated
    or corrupt pickle; both messages name ``where``.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), where).load()
    except UnsafePickleError as e:
        msg = str(e)
        raise UnsafePickleError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError) as e:
        raise SceneError(f"{where}: not a readable pickle (truncated or corrupt: "
                         f"{type(e).__name__}: {e})") from None


def safe_load(path: str | os.PathLike) -> Any:
    """Read and unpickle a file with :class:`RestrictedUnpickler`."""
    path = Path(path)
    return safe_loads(path.read_bytes(), str(path))
