"""Per-module cost of a recorded step: a stack of tiny layers, where torchdiag's Python dominates.

Prints, for stacks of 250 to 2000 modules (Linear(8, 8) + ReLU pairs, batch 4, every step recorded), the time of
a step with and without torchdiag in the same run; the difference per watched module, in all and split into the
forward, the backward and the end of the step (``step()``); the part of it the end-of-step diagnosis takes; and
Python's cyclic garbage collector's time per step with and without torchdiag (the objects a recorded step keeps
for a while make it run). A cost linear in depth gives the same microseconds per module at every size. The watch
is numbered on to step 1000 after its first step, as in overhead.py; ``--tensorboard`` writes its scalars to a
temporary log directory (without it, no sink is open).

    python benchmarks/step_cost.py [--repeats 20] [--tensorboard]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import warnings

import torch
from overhead import FAST_FORWARD, _fast_forward
from torch import nn

import torchdiag
from torchdiag._diagnose import diagnose as diagnose_module


def stack(modules: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(modules // 2) for m in (nn.Linear(8, 8), nn.ReLU())])


def step_time(model: nn.Module, x: torch.Tensor, steps: int, logdir: str | None) -> dict[str, float]:
    """Median seconds of the forward, the backward, the end of the step and the whole step; the median seconds
    of diagnose() per step (0 without torchdiag); and the mean seconds per step the cyclic garbage collector ran.
    ``logdir`` "": no torchdiag; None: a watch without a sink."""
    spent: list[float] = []
    collecting = [0.0, 0.0]  # start of the collection running, seconds collected in the timed steps

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            collecting[0] = time.perf_counter()
        else:
            collecting[1] += time.perf_counter() - collecting[0]

    original = diagnose_module.diagnose

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = original(*a, **k)
        spent.append(time.perf_counter() - t0)
        return out

    parts: dict[str, list[float]] = {"forward": [], "backward": [], "end": [], "step": []}
    publish_module = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if logdir != "":
            publish_module = sys.modules["torchdiag._sinks.publish"]  # where a watch diagnoses each completed step
            publish_module.diagnose = timed
            ctx = torchdiag.watch(model, logdir=logdir, every=1)
        else:
            ctx = None
        try:
            diag = ctx.__enter__() if ctx is not None else None
            for i in range(steps):
                if i == 1:
                    _fast_forward(diag, FAST_FORWARD)
                    gc.callbacks.append(on_gc)
                t0 = time.perf_counter()
                loss = model(x).sum()
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                if diag is not None:
                    diag.step()
                t3 = time.perf_counter()
                if i:
                    for key, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                        parts[key].append(v)
        finally:
            if on_gc in gc.callbacks:
                gc.callbacks.remove(on_gc)
            if ctx is not None:
                ctx.__exit__(None, None, None)
            if publish_module is not None:
                publish_module.diagnose = original
    out = {key: statistics.median(v) for key, v in parts.items()}
    out["diagnosis"] = statistics.median(spent[1:]) if len(spent) > 1 else 0.0
    out["gc"] = collecting[1] / (steps - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="steps per measurement (after a first, dropped)")
    parser.add_argument("--tensorboard", action="store_true", help="the watch writes TensorBoard scalars")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(4, 8)
    print(f"torch {torch.__version__}, 1 thread, {args.repeats} steps per size, TensorBoard "
          f"{'on' if args.tensorboard else 'off'}")
    print("| modules | step without | step with (median) | per module: forward / backward / end of step / all |"
          " of which diagnosis per module | garbage collection per step, without / with (mean) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for modules in (250, 500, 1000, 2000):
        model = stack(modules)
        base = step_time(model, x, args.repeats + 1, logdir="")
        with_td = step_time(model, x, args.repeats + 1,
                            logdir=tempfile.mkdtemp(prefix="torchdiag-cost-") if args.tensorboard else None)
        per = {k: (with_td[k] - base[k]) / modules * 1e6 for k in ("forward", "backward", "end", "step")}
        print(f"| {modules} | {base['step'] * 1e3:.1f} ms | {with_td['step'] * 1e3:.1f} ms |"
              f" {per['forward']:.1f} / {per['backward']:.1f} / {per['end']:.1f} / {per['step']:.1f} µs |"
              f" {with_td['diagnosis'] / modules * 1e6:.1f} µs |"
              f" {base['gc'] * 1e3:.1f} / {with_td['gc'] * 1e3:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
