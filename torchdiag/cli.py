"""Command line: ``torchdiag demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchdiag", description="PyTorch per-layer diagnostics.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="flag a badly initialised deep MLP, fix it, train it (generated data)")
    demo.add_argument("--logdir", default="runs/demo", help="TensorBoard log directory (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=60, help="training steps per run (default: 60)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(logdir=args.logdir, steps=args.steps)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
