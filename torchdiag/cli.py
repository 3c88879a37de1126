"""Command line: ``torchdiag demo`` and ``torchdiag summarize LOGDIR``."""

from __future__ import annotations

import argparse
import sys

from .report import STATUSES


def _problems(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in STATUSES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(STATUSES)}; got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchdiag", description="PyTorch per-layer diagnostics.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="flag a badly initialised deep MLP, fix it, train it (generated data)")
    demo.add_argument("--logdir", default="runs/demo", help="TensorBoard log directory (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=60, help="training steps per run (default: 60)")
    summ = sub.add_parser(
        "summarize", help="read a TensorBoard logdir written by torchdiag and print the report of a step",
        description="Print, for the latest recorded step (or --step N) of each torchdiag run under LOGDIR, the "
                    "per-layer table, the flagged layers, when each problem first appeared and the warnings. "
                    "Exit status: 0 nothing flagged, 1 something flagged (restricted by --fail-on), "
                    "2 no torchdiag events (missing or empty logdir, unrecorded step).")
    summ.add_argument("logdir", metavar="LOGDIR", help="a run's logdir, or a folder of runs")
    summ.add_argument("--step", type=int, default=None, help="the recorded step to report (default: the latest)")
    summ.add_argument("--fail-on", type=_problems, default=None, metavar="PROBLEMS",
                      help=f"exit 1 only for these problems, comma-separated, from: {','.join(STATUSES)}"
                           " (default: any)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(logdir=args.logdir, steps=args.steps)
    if args.command == "summarize":
        from .summarize import summarize

        return summarize(args.logdir, step=args.step, fail_on=args.fail_on)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
