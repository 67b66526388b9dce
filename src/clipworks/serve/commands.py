"""Subcommands of `clipworks` for this package (registered by `clipworks.cli`)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `clipworks` parser (none yet)."""
