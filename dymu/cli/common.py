"""Pieces shared by sub-commands: the one-line-error parser and config arguments."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from dymu.config import Config, load_config


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``-c CONFIG`` and trailing ``section.key=value`` overrides."""
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="YAML config (defaults: the built-in dataclasses)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides applied last, e.g. data.size=[32,32] run.device=cpu",
    )


def config_from_args(args: argparse.Namespace, *extra: str) -> Config:
    """Resolve the config of a command: file, then ``extra`` overrides, then the user's."""
    return load_config(args.config, [*extra, *args.overrides])
