"""Command-line entries of the daemon side (serve, hook, install)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands", "run"]


def add_commands(sub: Any) -> None:
    """Register the daemon's subcommands on the main parser."""


def run(args: argparse.Namespace) -> int:
    raise SystemExit(f"unknown command {args.command!r}")
