"""The registry of ``cam-vllm`` subcommands (``cli.py`` builds the parser from it).

A module of its own so that the modules defining subcommands (``bench``, ``loadtest``, ``eval.cli``)
and the CLI that imports them depend on it, not on each other.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SUBCOMMANDS", "Subcommand", "register_subcommand"]


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
) -> None:
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS[name] = Subcommand(help, add_arguments, run)
