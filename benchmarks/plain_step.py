"""What a step the watch does not record costs, paired in one process: the always-on part of a watch.

    python benchmarks/plain_step.py [--workload tiny|llama|gpt2|resnet|mlp|cnn|transformer] [--rounds 30]
                                    [--steps 20] [--small] [--quick]

Each round times ``--steps`` training steps (AdamW, ``overhead.train_step``) of the same model four ways, in an
order that rotates between rounds: unwatched; inside a watch that records none of them (``every`` larger than
the run, its step 0 left out of the timing); under an empty process-wide forward pre-hook and forward hook
(PyTorch's own cost of such a pair: its slow call path at every module call); under an empty pre-hook alone. Each
figure is the median over rounds of the round's mean step minus the unwatched one of the same round, so drift
between rounds cancels.

``--small``: the workload at ``budget.py --quick``'s sizes (a 2-layer Llama with 16 tokens: a short step, where
this method reads to a few µs; on a 90 ms step it reads to about ±1 ms). ``budget.py --parts`` gives the same part
of a whole run, with more noise on large steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.nn.modules import module as module_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchdiag  # noqa: E402
from benchmarks import budget, overhead  # noqa: E402


def _steps(model, loss_fn, opt, n: int, mon=None) -> float:
    """The mean time of ``n`` training steps (``overhead.train_step``, the monitor's ``step()`` included), seconds."""
    mon = overhead.NoMonitor() if mon is None else mon
    return sum(overhead.train_step(model, opt, mon, loss_fn) for _ in range(n)) / n


def measure(name: str, rounds: int, steps: int, quick: bool) -> dict[str, float]:
    """Per variant, the median added time of a step over rounds (seconds)."""
    torch.manual_seed(0)
    model, loss_fn = budget.WORKLOADS[name](torch.device("cpu"), quick)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _steps(model, loss_fn, opt, 3)

    def none() -> float:
        return _steps(model, loss_fn, opt, steps)

    def watch() -> float:
        with torchdiag.watch(model, logdir=logdir, every=10**9) as diag:
            _steps(model, loss_fn, opt, 1, diag)  # (step 0, recorded)
            return _steps(model, loss_fn, opt, steps, diag)

    def hooks(post: bool) -> float:
        handles = [module_mod.register_module_forward_pre_hook(lambda m, a: None)]
        if post:
            handles.append(module_mod.register_module_forward_hook(lambda m, a, k, o: None, with_kwargs=True,
                                                                   always_call=True))
        try:
            return _steps(model, loss_fn, opt, steps)
        finally:
            for h in handles:
                h.remove()

    variants = {"none": none, "watch, not recording": watch, "empty hook pair": lambda: hooks(True),
                "empty pre-hook": lambda: hooks(False)}
    added: dict[str, list[float]] = {k: [] for k in variants if k != "none"}
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = list(variants)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # (the order rotates between rounds)
            times = {k: variants[k]() for k in order}
            for k in added:
                added[k].append(times[k] - times["none"])
    return {k: statistics.median(v) for k, v in added.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="tiny", choices=sorted(budget.WORKLOADS))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--small", action="store_true", help="the workload at budget.py --quick's sizes")
    p.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: proves that it runs")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rounds, steps = (2, 2) if a.quick else (a.rounds, a.steps)
    small = a.small or a.quick
    figures = measure(a.workload, rounds, steps, small)
    print(f"{a.workload}{' (small)' if small else ''}: torch {torch.__version__}, 1 thread, {rounds} rounds of"
          f" {steps} steps;"
          " time added to a step (median of the rounds' differences)")
    for k, v in figures.items():
        print(f"  {k:22s} {v * 1e6:+8.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
