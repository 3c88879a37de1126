"""Per-module cost of a recorded step: a stack of tiny layers, where torchdiag's Python dominates.

Prints, for stacks of 250 to 2000 modules (Linear(8, 8) + ReLU pairs, batch 4, every step recorded), the time of
a step with and without torchdiag in the same run, the difference per watched module, the part of it the
end-of-step diagnosis takes, and Python's cyclic garbage collector's time per step with torchdiag (the objects a
recorded step keeps for a while make it run). A cost linear in depth gives the same microseconds per module at
every size. The watch is numbered on to step 1000 after its first step, as in overhead.py.

    python benchmarks/step_cost.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings

import torch
from overhead import FAST_FORWARD, _fast_forward
from torch import nn

import torchdiag
from torchdiag import diagnose as diagnose_module


def stack(modules: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(modules // 2) for m in (nn.Linear(8, 8), nn.ReLU())])


def step_time(model: nn.Module, x: torch.Tensor, steps: int, watch: bool) -> tuple[float, float, float]:
    """Median seconds per step, the median seconds of diagnose() per step (0 without torchdiag), and the mean
    seconds per step the cyclic garbage collector ran."""
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

    times = []
    publish_module = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if watch:
            publish_module = sys.modules["torchdiag.publish"]  # where a watch diagnoses each completed step
            publish_module.diagnose = timed
            ctx = torchdiag.watch(model)
        else:
            ctx = None
        try:
            diag = ctx.__enter__() if ctx is not None else None
            for i in range(steps):
                if i == 1:
                    _fast_forward(diag, FAST_FORWARD)
                    gc.callbacks.append(on_gc)
                t0 = time.perf_counter()
                model(x).sum().backward()
                if diag is not None:
                    diag.step()
                times.append(time.perf_counter() - t0)
        finally:
            if on_gc in gc.callbacks:
                gc.callbacks.remove(on_gc)
            if ctx is not None:
                ctx.__exit__(None, None, None)
            if publish_module is not None:
                publish_module.diagnose = original
    return (statistics.median(times[1:]), statistics.median(spent[1:]) if len(spent) > 1 else 0.0,
            collecting[1] / (steps - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="steps per measurement (after a first, dropped)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(4, 8)
    print("| modules | step without | step with (median) | per module | of which diagnosis per module |"
          " garbage collection per step, without / with (mean) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for modules in (250, 500, 1000, 2000):
        model = stack(modules)
        base, _, gc_base = step_time(model, x, args.repeats + 1, watch=False)
        with_td, diag, gc_td = step_time(model, x, args.repeats + 1, watch=True)
        per = (with_td - base) / modules * 1e6
        print(f"| {modules} | {base * 1e3:.1f} ms | {with_td * 1e3:.1f} ms | {per:.1f} µs |"
              f" {diag / modules * 1e6:.1f} µs | {gc_base * 1e3:.1f} / {gc_td * 1e3:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
