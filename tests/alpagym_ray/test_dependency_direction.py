"""DESIGN.md, "Dependency direction": the runtime core of ``alpagym_ray`` names no concrete env, policy,
reward or algorithm (it builds them from config ``_target_`` paths inside each actor), and ``envs``,
``learners`` and ``rewards`` do not import each other.

Checked on the source with ``ast``: an ``import`` / ``from ... import`` of a concrete package, or a
string literal that is an import path into one (a hard-coded ``_target_``), outside docstrings.
The composition roots may name them: ``alpagym_ray/api.py``, ``alpagym_ray/cli.py``,
``alpagym_ray/commands/`` and the YAML of ``alpagym_ray/conf/``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONCRETE = ("envs", "learners", "rewards")
COMPOSITION_ROOTS = ("api.py", "cli.py")
"""Modules of ``alpagym_ray/`` (besides ``commands/``) that may name the concrete packages."""
_TARGET = re.compile(r"^(?P<pkg>[A-Za-z_]\w*)(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?$")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of the module, its classes and functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.add(id(body[0].value))
    return out


def references(source: str, packages: tuple[str, ...], name: str = "<source>") -> list[str]:
    """``"name:line: what"`` for every import of ``packages`` and every string literal that is an
    import path into one of them (``pkg.module.attr`` or ``pkg.module:attr``), docstrings excepted."""
    tree = ast.parse(source, filename=name)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{name}:{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in packages]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in packages:
            found.append(f"{name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            m = _TARGET.match(node.value.strip())
            if m and m.group("pkg") in packages and ("." in node.value or ":" in node.value):
                found.append(f"{name}:{node.lineno}: literal {node.value!r}")
    return found


def core_modules() -> list[Path]:
    """Every module of the runtime core: ``alpagym_ray/*.py`` but the composition roots."""
    return sorted(p for p in (ROOT / "alpagym_ray").glob("*.py") if p.name not in COMPOSITION_ROOTS)


def test_the_checker_finds_imports_and_literal_targets_but_not_docstrings():
    source = '''"""Module doc naming learners.grpo.GRPO is fine."""
import os
import learners.grpo
from rewards.compute import RewardFn
from alpagym_ray.targets import import_target
from . import columns


def f():
    """rewards.compute.reward_fn in a docstring is fine."""
    a = import_target("learners.flat_params.load_flat_params")
    b = {"_target_": "envs.drivesim.factory:make_batched_env"}
    c = "the learners package"          # prose, not a path
    d = "learners"                      # a bare word, not a path
    return a, b, c, d
'''
    found = references(source, CONCRETE, "m.py")
    assert found == ["m.py:3: import learners.grpo", "m.py:4: from rewards.compute import ...",
                     "m.py:11: literal 'learners.flat_params.load_flat_params'",
                     "m.py:12: literal 'envs.drivesim.factory:make_batched_env'"]


def test_core_modules_are_the_runtime():
    names = {p.name for p in core_modules()}
    assert {"learner.py", "rollout_worker.py", "episode_buffer.py", "train_loop.py", "weights.py", "evaluate.py",
            "columns.py", "metrics.py", "flat_params.py", "targets.py"} <= names
    assert not names & set(COMPOSITION_ROOTS)


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_runtime_core_names_no_concrete_package(path):
    found = references(path.read_text(), CONCRETE, str(path.relative_to(ROOT)))
    assert not found, ("the runtime core builds envs, policies, rewards and algorithms from config "
                       "_target_ paths; move these to a composition root or the config:\n" + "\n".join(found))


@pytest.mark.parametrize("package", CONCRETE)
def test_concrete_packages_do_not_import_each_other(package):
    others = tuple(p for p in CONCRETE if p != package)
    found = [ref for path in sorted((ROOT / package).rglob("*.py"))
             for ref in references(path.read_text(), others, str(path.relative_to(ROOT)))]
    assert not found, f"{package} must not import {others} (DESIGN.md, Dependency direction):\n" + "\n".join(found)
