"""The CPU statistics kernel (``torchdiag._stats._cpurow``) against the ATen path, paired step by step.

    python benchmarks/cpu_kernel.py [--workload mlp|cnn|transformer|all] [--steps 30] [--threads 1] [--histograms]

One unwatched copy of the model and one watched (``every=1``, scalars to TensorBoard) train side by side; each
round runs one step of the unwatched model, one watched step with the kernel and one with the ATen path, in a
rotating order. The ratios are medians of per-round ratios to the unwatched step of the same round (these
machines are noisy: only figures from one run are compared). ``--histograms``: every watched step is a histogram
step too (``histogram_every: 1``), so the kernel's one-read binning is in the comparison.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchdiag  # noqa: E402
from benchmarks.overhead import WORKLOADS, NoMonitor, train_step  # noqa: E402
from torchdiag._stats import _cpurow as cpurow  # noqa: E402


def run(name: str, steps: int, histograms: bool = False) -> dict[str, float]:
    model, loss_fn = WORKLOADS[name](torch.device("cpu"), False)
    plain = copy.deepcopy(model)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-3) for m in (model, plain)}

    def step(m, w=None):
        return train_step(m, opts[id(m)], w if w is not None else NoMonitor(), loss_fn)

    ratios: dict[str, list[float]] = {"kernel": [], "aten": []}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, logdir=tmp, every=1, config={"warnings": False, "histogram_every": int(histograms),
                                                                "overview_every": 0}) as w:
            for _ in range(3):
                step(plain), step(model, w)
            for i in range(steps):
                order = ["plain", "kernel", "aten"]
                order = order[i % 3:] + order[: i % 3]
                t = {}
                for v in order:
                    if v == "plain":
                        t[v] = step(plain)
                    else:
                        cpurow.set_enabled(v == "kernel")
                        t[v] = step(model, w)
                for v in ratios:
                    ratios[v].append(t[v] / t["plain"])
    cpurow.set_enabled(True)
    return {v: statistics.median(r) for v, r in ratios.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="all", choices=["all", *WORKLOADS])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--histograms", action="store_true", help="every watched step bins histograms too")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s); kernel: {cpurow.status()}")
    print(f"  {'workload':12s} {'kernel':>8s} {'aten':>8s}   (every=1{', histograms' if a.histograms else ''},"
          " median ratio to the unwatched step)")
    for name in (WORKLOADS if a.workload == "all" else [a.workload]):
        r = run(name, a.steps, a.histograms)
        print(f"  {name:12s} {r['kernel']:8.3f} {r['aten']:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
