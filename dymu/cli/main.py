"""Entry point of the ``dymu`` command: parse, dispatch, turn errors into exit codes.

Exit codes: 0 ok, 2 bad input (usage, config, names, paths), 1 runtime failure. User
errors print one line on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Sequence

from dymu import __version__
from dymu.artifacts import reason
from dymu.cli import (
    anchor_cmds,
    baselines_cmd,
    bench_cmd,
    config_cmd,
    datasets,
    export_cmd,
    profile_cmd,
    search_cmds,
)
from dymu.cli.common import Parser
from dymu.errors import DymuError
from dymu.lock import release_all

DESCRIPTION = """dymu: controllable multi-task networks.

Estimate task affinity, search tree-structured multi-task networks that follow a task
preference and a FLOPs budget, and compile them for small GPUs. FLOPs are counted with
fvcore: one fused multiply-add = one FLOP."""

EXAMPLES = """examples:
  dymu search --run runs/default
  dymu sample --run runs/default --preference 0.4,0.3,0.2,0.1 --budget 0.8
  dymu export --run runs/default --budget 0.5 --out export/default
  dymu bench --run runs/default
  dymu profile --run runs/default --backend onnxruntime --batch 8 --out latency.json
  dymu export --run runs/default --latency-ms 9 --latency latency.json --out export/9ms
  dymu datasets list
  dymu datasets show synthscenes --out synthscenes.png
  dymu config -c configs/quick.yaml data.size=[32,32]
  dymu affinity -c configs/quick.yaml --run runs/quick
  dymu space -c configs/quick.yaml --run runs/quick

Run 'dymu COMMAND --help' for the options of a command."""


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")

_NUMERIC_OPTIONS = ("--preference", "--budget")
"""Options whose value may start with a minus sign (``--preference -0.1,0.6,0.5``), which
argparse would take for an option; joined as ``--preference=-0.1,...`` so that the value
gets the option's own check and message."""


def _join_numeric_values(argv: Sequence[str]) -> list[str]:
    words = list(argv)
    joined: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in _NUMERIC_OPTIONS and i + 1 < len(words) and re.match(r"^-[\d.]", words[i + 1]):
            joined.append(f"{word}={words[i + 1]}")
            i += 2
            continue
        joined.append(word)
        i += 1
    return joined


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks instead of one-line errors",
    )
    parser = Parser(
        prog="dymu",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dymu {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    datasets.add_parser(sub, common)
    config_cmd.add_parser(sub, common)
    anchor_cmds.add_parsers(sub, common)
    search_cmds.add_parsers(sub, common)
    baselines_cmd.add_parser(sub, common)
    export_cmd.add_parser(sub, common)
    bench_cmd.add_parser(sub, common)
    profile_cmd.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    # KEY=VALUE overrides may come anywhere after the command (argparse alone would stop
    # taking them after the first option), so unknown words of that form are collected.
    argv = _join_numeric_values(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    overrides = [w for w in rest if _OVERRIDE.match(w)]
    unknown = [w for w in rest if not _OVERRIDE.match(w)]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        return int(args.func(args) or 0)
    except DymuError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"dymu: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dymu: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"dymu: internal error: {type(exc).__name__}: {reason(exc)} "
            "(rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1
    finally:
        release_all()  # a library caller keeps its locks; a finished command does not
