"""The ``alpagym-ray`` console script (identical to ``python -m alpagym_ray.cli``).

The first word is a subcommand. ``train`` is the default when the first word is a Hydra override
(``key=value``), so ``python -m alpagym_ray.cli policy=trajectory reward=progress_safety`` trains.
``train``, ``pretrain`` and ``eval`` take Hydra overrides; the others take ordinary flags.

This module is the composition root: it is the one place that knows the concrete packages, and it
imports each command's module only when that command runs (so ``--help`` is fast).
"""

from __future__ import annotations

import difflib
import importlib
import sys

# subcommand (one or two words) -> "module:function" taking argv (list[str]) and returning an exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("alpagym_ray.commands.train:main", "closed-loop GRPO post-training (Hydra overrides)"),
    "pretrain": ("alpagym_ray.commands.pretrain:main", "open-loop behaviour cloning (Hydra overrides)"),
    "eval": ("alpagym_ray.commands.evaluate:main", "closed-loop evaluation of a policy (Hydra overrides)"),
    "scenes generate": ("alpagym_ray.commands.scenes_generate:main", "generate procedural scenes"),
    "scenes import": ("alpagym_ray.commands.scenes_import:main", "import scenes from dataset files"),
    "scenes list": ("alpagym_ray.commands.scenes_manage:list_main", "list the scenes of a set"),
    "scenes show": ("alpagym_ray.commands.scenes_show:main", "draw a scene to PNG"),
    "scenes split": ("alpagym_ray.commands.scenes_manage:split_main", "split a set into train / held-out"),
    "scenes stats": ("alpagym_ray.commands.scenes_manage:stats_main", "statistics of a scene set"),
    "scenes pull": ("alpagym_ray.commands.scenes_hub:pull_main", "download a scene set from the HF Hub"),
    "scenes push": ("alpagym_ray.commands.scenes_hub:push_main", "upload a scene set to the HF Hub"),
    "compare": ("alpagym_ray.commands.compare:main", "compare policies closed-loop"),
    "export": ("alpagym_ray.commands.export:main", "export a checkpoint for AlpaSim"),
    "serve-driver": ("alpagym_ray.commands.serve_driver:main", "serve a policy as an AlpaSim driver"),
    "alpasim-runtime": ("alpagym_ray.commands.alpasim_runtime:main", "AlpaSim runtime backed by drivesim"),
    "bench": ("alpagym_ray.commands.bench:main", "benchmarks"),
    "rollout": ("alpagym_ray.commands.rollout:main", "roll a scripted policy through drivesim"),
}


def usage() -> str:
    width = max(len(k) for k in COMMANDS)
    lines = ["usage: alpagym-ray <command> [args]   (or: alpagym-ray key=value ... to train)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """Split argv into (command, rest); raise SystemExit with a did-you-mean on an unknown word."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0)
    if "=" in argv[0] or argv[0].startswith("+") or argv[0].startswith("--"):
        return "train", argv
    two = " ".join(argv[:2])
    if two in COMMANDS:
        return two, argv[2:]
    if argv[0] in COMMANDS:
        return argv[0], argv[1:]
    if argv[0] == "scenes":
        subs = [k.split()[1] for k in COMMANDS if k.startswith("scenes ")]
        word = argv[1] if len(argv) > 1 else ""
        close = difflib.get_close_matches(word, subs, n=1)
        hint = f" Did you mean 'scenes {close[0]}'?" if close else ""
        raise SystemExit(f"alpagym-ray: unknown scenes subcommand {word!r}; valid: {subs}.{hint}")
    close = difflib.get_close_matches(argv[0], [k.split()[0] for k in COMMANDS], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise SystemExit(f"alpagym-ray: unknown command {argv[0]!r}.{hint}\n\n{usage()}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = resolve(argv)
    target, _ = COMMANDS[command]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"alpagym-ray: '{command}' is not available in this version yet", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
