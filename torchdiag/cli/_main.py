"""Command line: ``torchdiag demo``, ``torchdiag summarize LOGDIR`` and ``torchdiag check MODULE:FACTORY``.

Tables are coloured only on a terminal and never when ``NO_COLOR`` is set (``report.use_color``)."""

from __future__ import annotations

import argparse
import sys

from .._report.report import STATUSES
from ._check_cli import add_arguments
from ._check_cli import parse_problems as _problems

# nothing here imports torch (nor TensorBoard): the arguments are parsed first, the command's modules imported after


class _Version(argparse.Action):
    """``--version``: torchdiag's, torch's, and whether the CPU statistics kernel was built with this install (torch
    is imported only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions and whether the CPU statistics kernel is in use, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        import torch

        from .. import __version__
        from .._stats.stats import cpu_kernel_status

        kernel = cpu_kernel_status()
        print(f"torchdiag {__version__} (torch {torch.__version__})\nCPU statistics kernel: "
              f"{kernel if kernel != 'on' else 'on (built with this install)'}")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchdiag", description="PyTorch per-layer diagnostics.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="flag a badly initialised deep MLP, fix it, train it (generated data)")
    demo.add_argument("--logdir", default="runs/demo", help="TensorBoard log directory (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=60, help="training steps per run (default: 60)")
    summ = sub.add_parser(
        "summarize", help="read a TensorBoard logdir written by torchdiag and print the report of a step",
        description="Print, for the latest recorded step (or --step N) of each torchdiag run under LOGDIR, the "
                    "per-layer table, the flagged layers, when each problem first appeared and the warnings, and "
                    "judge the whole run by its findings (flags at the first recorded step, NaN/Inf, flags that "
                    "persisted; with --step N: that step alone). A folder of runs ends with a table of all runs. "
                    "Exit status: 0 nothing found, 1 something found (restricted by --fail-on), "
                    "2 no torchdiag events (missing or empty logdir, unrecorded step), or an event file that stops "
                    "early (cut off or corrupt) with nothing flagged in what could be read.")
    summ.add_argument("logdir", metavar="LOGDIR", help="a run's logdir, or a folder of runs")
    summ.add_argument("--step", type=int, default=None,
                      help="the recorded step to report and judge alone (default: the latest, and the whole run is"
                           " judged)")
    summ.add_argument("--fail-on", type=_problems, default=None, metavar="PROBLEMS",
                      help=f"exit 1 only for these problems, comma-separated, from: {', '.join(STATUSES)}"
                           " (default: any)")
    check = sub.add_parser(
        "check", help="import a model factory of yours and diagnose the model on a random input",
        description="Import MODULE (a dotted module importable from the current directory, or a path to a .py file),"
                    " call FACTORY() for an nn.Module, run torchdiag.check() on a seeded random input of"
                    " --input-shape and print the report. Exit status: 0 nothing flagged, 1 something flagged"
                    " (restricted by --fail-on), 2 the model could not be checked (import error, missing"
                    " attribute, bad shape, a model that fails on the input).")
    add_arguments(check)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(logdir=args.logdir, steps=args.steps)
    if args.command == "summarize":
        from ._summarize import summarize

        return summarize(args.logdir, step=args.step, fail_on=args.fail_on)
    if args.command == "check":
        from ._check_cli import run_check

        return run_check(args)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
