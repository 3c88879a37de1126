"""What the precision figures cost: a float16 autocast run watched at ``every=1`` with and without the range rows
(the headroom and underflow counts of each float16 output and gradient), against no monitoring, in one process.

    python benchmarks/precision_cost.py [--workload tiny|mlp] [--steps 40] [--repeats 5] [--threads 1]

Each repeat trains a fresh copy of the same model for ``--steps`` steps per variant, the order rotating between
repeats; a variant's ratio is its whole-run time over the unmonitored run's in the same repeat (median over
repeats). "without range rows" is the same watch with float16 left out of ``stats.NARROW`` (the dtypes whose range
is judged): the difference between the two rows is what the precision figures add.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchdiag  # noqa: E402
from torchdiag._stats import stats  # noqa: E402


def workload(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    width, depth, inputs = (256, 4, 64) if name == "tiny" else (512, 24, 512)
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    return model, torch.randn(64, inputs), torch.randint(0, 10, (64,))


@contextlib.contextmanager
def without_range_rows():
    saved = dict(stats.NARROW)
    stats.NARROW.clear()
    try:
        yield
    finally:
        stats.NARROW.update(saved)


def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, variant: str, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    watch = (contextlib.nullcontext() if variant == "none" else
             torchdiag.watch(model, every=1, optimizer=opt, scaler=scaler, warnings=False))
    ranges = without_range_rows() if variant == "every=1 without range rows" else contextlib.nullcontext()
    start = time.perf_counter()
    with warnings.catch_warnings(), ranges, watch:
        warnings.simplefilter("ignore")
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            loss.item()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="mlp", choices=["tiny", "mlp"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base, x, y = workload(a.workload)
    names = ["none", "every=1 without range rows", "every=1"]
    for v in names:  # warm-up: first calls, the CPU kernel's load
        run(copy.deepcopy(base), x, y, v, 3)
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(a.repeats):
        for v in names[r % len(names):] + names[:r % len(names)]:
            times[v].append(run(copy.deepcopy(base), x, y, v, a.steps))
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} thread(s), float16 autocast + GradScaler,"
          f" {a.workload}, {a.steps} steps, median of {a.repeats}")
    for v in names[1:]:
        ratio = statistics.median(t / n for t, n in zip(times[v], times["none"]))
        print(f"{v:28s} {ratio:.3f}x")
    print(f"{'none':28s} {1e3 * statistics.median(times['none']) / a.steps:.2f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
