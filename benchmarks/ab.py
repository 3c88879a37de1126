"""Two versions of torchdiag side by side in one process: ``every=1`` step time against no monitoring.

    git worktree add /tmp/old <commit>
    python benchmarks/ab.py --old /tmp/old [--workload mlp|cnn|transformer] [--rounds 8]

The old checkout's package is copied under another name (``torchdiag_old``) so both import at once;
variants run interleaved round by round (this machine is noisy: compare only within one run).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402

import torchdiag  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="a checkout of the older version (its torchdiag/ is used)")
    p.add_argument("--workload", default="mlp", choices=list(overhead.WORKLOADS))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--scalars-only", action="store_true",
                   help="no histograms or overview images: the per-step cost a long run pays (each round here is a"
                        " new watch, whose first steps get histograms and images at steps 0, 1, 2, 4...)")
    p.add_argument("--without-signals", action="store_true",
                   help="the new version with its instability signals and non-finite tripwire off: the cost of the"
                        " rest alone (when the old version predates them)")
    a = p.parse_args(argv)
    src = Path(a.old) / "torchdiag"
    if not (src / "__init__.py").is_file():
        p.error(f"--old: no torchdiag package in {a.old!r}")
    tmp = tempfile.mkdtemp()
    shutil.copytree(src, Path(tmp) / "torchdiag_old")
    sys.path.insert(0, tmp)
    import torchdiag_old

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, loss_fn = overhead.WORKLOADS[a.workload](torch.device("cpu"), False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cfg = {"warnings": False}
    if a.scalars_only:  # each round is a new watch: the images and histograms of a run's first steps dominate
        cfg["histogram_every"] = 0
    known = {f.name for f in dataclasses.fields(torchdiag.Config)}
    new_cfg = dict(cfg, overview_every=0) if a.scalars_only and "overview_every" in known else dict(cfg)
    if a.without_signals:
        new_cfg.update(attention_rules=False, output_logits_rule=False, adam_epsilon_rule=False,
                       nonfinite_origin=False)
    variants = {"none": lambda: overhead.NoMonitor(),
                "old every=1": lambda: torchdiag_old.watch(model, logdir=f"{tmp}/old", config=cfg),
                "new every=1": lambda: torchdiag.watch(model, logdir=f"{tmp}/new", config=new_cfg)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    warnings.simplefilter("ignore")
    for r in range(a.rounds + 1):  # the first round warms up
        for name, make in variants.items():
            with make() as mon:
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    loss_fn(model).backward()
                    opt.step()
                    opt.zero_grad()
                    mon.step()
                    if r:
                        times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["none"])
    print(f"{a.workload}: none {base * 1e3:.1f} ms; " +
          ", ".join(f"{k} {statistics.median(v) / base:.3f}x" for k, v in times.items() if k != "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
