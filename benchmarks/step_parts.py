"""Where a recorded step's overhead goes: forward, backward and the end of the step, against the read floor.

For one workload of ``overhead.py`` (CPU, one torch thread), each variant trains its own copy, one step of each
in turn per round (as ``overhead.py``), and the forward, the backward and the end of the step (the monitor's
``step()``) are timed apart. Variants: no monitoring, the read floor (one ``sum`` per activation and gradient),
torchdiag ``every=1`` with TensorBoard scalars, and the same watch with its statistics rows replaced by a
constant (no tensor read: what is left is torchdiag's Python, with no histogram steps either). Then the parts
of torchdiag's end of step, from timers around them: the weight rows and the step's host copy (``_launch``),
decoding and merging the rows, the diagnosis, and the TensorBoard sink.

    python benchmarks/step_parts.py [--workload tiny|llama|gpt2|resnet|mlp|cnn|transformer] [--rounds 30]

Each figure is a median over the rounds, in ms, as a difference from no monitoring where it says ``+``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import budget  # noqa: E402
import overhead  # noqa: E402

import torchdiag  # noqa: E402
from torchdiag._stats import stats  # noqa: E402

_ZERO_ROW = torch.zeros(7, dtype=torch.float64)


def _zero_block_row(x, block, i, *a, **k) -> None:
    block[i].zero_()


def _timed(obj, name: str, label: str, into: dict) -> None:
    """Wrap ``obj.name`` so that each call's seconds are appended to ``into[label]``."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            into[label].append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mlp", choices=list(budget.WORKLOADS))
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, loss_fn = budget.WORKLOADS[args.workload](torch.device("cpu"), False)
    logdir = tempfile.mkdtemp(prefix="torchdiag-parts-")
    act_row, grad_row, cpu_row_into = stats.act_row, stats.grad_row, stats.cpu_row_into
    parts: dict[str, list[float]] = collections.defaultdict(list)
    runs, contexts = {}, []
    for name in ("none", "read floor", "torchdiag every=1", "torchdiag, no reads"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        if name == "none":
            mon = overhead.NoMonitor()
        elif name == "read floor":
            mon = overhead.ReadFloor(m)
        else:
            # (no histograms without reads: a constant row has no range to bin; one step in 100 has them)
            config = {"warnings": False} if name == "torchdiag every=1" else {"warnings": False, "histogram_every": 0}
            ctx = torchdiag.watch(m, logdir=f"{logdir}/{len(runs)}", every=1, config=config)
            mon = ctx.__enter__()
            contexts.append(ctx)
        runs[name] = (m, opt, mon)
    watched = runs["torchdiag every=1"][2]
    rec, out = watched._recorder, watched._out  # (private attributes: the benchmark looks inside)
    _timed(rec, "_launch", "weight rows and the host copy", parts)
    _timed(rec, "_complete", "decode and merge the rows", parts)
    _timed(out, "diagnose", "diagnosis", parts)
    if out.tb is not None:
        _timed(out.tb, "write", "TensorBoard sink", parts)
    times = {name: ([], [], []) for name in runs}
    for r in range(args.rounds + 3):
        if r == 3:
            parts.clear()
            for _, _, mon in runs.values():
                overhead._fast_forward(mon, overhead.FAST_FORWARD)
        for name, (m, opt, mon) in runs.items():
            if name == "torchdiag, no reads":  # the ATen path's rows and the CPU kernel's (into its host block)
                stats.act_row = stats.grad_row = lambda *a, **k: _ZERO_ROW
                stats.cpu_row_into = _zero_block_row
            try:
                t0 = time.perf_counter()
                loss = loss_fn(m)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                opt.zero_grad()
                t3 = time.perf_counter()
                mon.step()
                t4 = time.perf_counter()
            finally:
                stats.act_row, stats.grad_row, stats.cpu_row_into = act_row, grad_row, cpu_row_into
            if r >= 3:
                for i, v in enumerate((t1 - t0, t2 - t1, t4 - t3)):
                    times[name][i].append(v)
    med = {name: [statistics.median(v) * 1e3 for v in ts] for name, ts in times.items()}
    base = med["none"]
    print(f"{args.workload}: torch {torch.__version__}, CPU, 1 thread, {args.rounds} rounds (ms; + is against none)")
    print(f"  {'variant':24s} {'forward':>9s} {'backward':>9s} {'step()':>9s} {'total':>9s}")
    print(f"  {'none':24s} {base[0]:9.2f} {base[1]:9.2f} {base[2]:9.2f} {sum(base):9.2f}")
    for name, (f, b, s) in med.items():
        if name != "none":
            print(f"  {name:24s} {f - base[0]:+9.2f} {b - base[1]:+9.2f} {s:9.2f} {f + b + s - sum(base):+9.2f}")
    print("  torchdiag every=1, its end of step:")
    for label, v in parts.items():
        print(f"    {label:32s} {statistics.median(v) * 1e3:6.2f}")
    for ctx in contexts:
        ctx.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
