"""Build objects from config nodes carrying ``_target_`` import paths (Hydra's convention).

Registries do not cross process boundaries, so every Ray actor builds its env, policy and reward
from plain config dicts with this one function (DESIGN.md, "Dependency direction").
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def import_target(path: str) -> Any:
    """``package.module.attr`` or ``package.module:attr`` -> the object."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"_target_ must be an import path string, got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"_target_ {path!r} is not an import path (module.attribute)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"_target_ {path!r}: cannot import module {module_name!r} ({e})") from e
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportError(f"_target_ {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def to_plain(node: Any) -> Any:
    """OmegaConf / mapping / sequence -> plain Python containers (picklable, no interpolations)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, DictConfig | ListConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        pass
    if isinstance(node, Mapping):
        return {k: to_plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [to_plain(v) for v in node]
    return node


def instantiate(node: Mapping[str, Any], **overrides: Any) -> Any:
    """Call ``node["_target_"]`` with the node's other keys (plus ``overrides``) as keyword arguments."""
    plain = to_plain(node)
    if not isinstance(plain, dict) or "_target_" not in plain:
        raise ValueError(f"config node has no _target_: {plain!r}")
    kwargs = {k: v for k, v in plain.items() if k != "_target_"}
    kwargs.update(overrides)
    target = import_target(plain["_target_"])
    try:
        return target(**kwargs)
    except TypeError as e:
        raise TypeError(f"building {plain['_target_']} with {sorted(kwargs)}: {e}") from e
