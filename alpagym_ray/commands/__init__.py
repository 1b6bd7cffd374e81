"""Handlers of the CLI's subcommands, one module each; each exposes ``main(argv) -> int``."""
