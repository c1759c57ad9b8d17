"""The `imagemesh` command line.

Each command lives in its own module under `imagemesh.cli` and registers itself through
`register(commands)`, returning the function that runs it. Exit codes: 0 success, 1 a
command failed (e.g. a service is not serving), 2 bad usage or invalid configuration.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from imagemesh.config import ConfigError, Settings, load_settings

__all__ = ["COMMAND_MODULES", "Command", "main"]

# A command runs with its parsed arguments and, unless it declared `needs_settings = False`,
# the validated settings.
Command = Callable[[argparse.Namespace, Settings | None], int]

# The modules that define commands, in help order; each adds one line here.
COMMAND_MODULES = [
    "imagemesh.cli.serve",
    "imagemesh.cli.health",
    "imagemesh.cli.search",
    "imagemesh.cli.models",
    "imagemesh.cli.classify",
    "imagemesh.cli.dataset",
    "imagemesh.cli.train",
    "imagemesh.cli.storage",
    "imagemesh.cli.batch",
]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[Command, bool]]]:
    parser = argparse.ArgumentParser(
        prog="imagemesh", description="Store, search and classify images over gRPC."
    )
    parser.add_argument("--config", help="a TOML configuration file (else $IMAGEMESH_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    runners: dict[str, tuple[Command, bool]] = {}
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        for name, runner in module.register(commands).items():
            runners[name] = (runner, getattr(module, "needs_settings", True))
    return parser, runners


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.server.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    parser, runners = _parser()
    args = parser.parse_args(argv)
    runner, needs_settings = runners[args.command]
    if not needs_settings:
        return runner(args, None)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"imagemesh: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    return runner(args, settings)


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
