"""Two versions of torchdiag side by side in one process: ``every=1`` step time against no monitoring.

    git worktree add /tmp/old <commit>
    python benchmarks/ab.py --old /tmp/old [--workload mlp|cnn|transformer] [--rounds 8] [--steps 4]

The old checkout's package is copied under another name (``torchdiag_old``) so both import at once. Measured as
``overhead.py`` does (``overhead.warm`` / ``overhead.timed``): each variant trains its own copy of the model with
its watch open for the whole run, numbered on to step 1000, and each round is one step of every variant, paired
with the unmonitored step of its round (this machine is noisy: compare only within one run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import shutil
import sys
import tempfile
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
    p.add_argument("--every", default="1", help="both watches' cadence: an integer, or auto (the time budget, the"
                   " default a user gets); the ratios are then amortised over every step, recorded or not")
    p.add_argument("--scalars-only", action="store_true",
                   help="no histograms or overview images (the median hides the 1 step in 100 that has them)")
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
    every = a.every if a.every == "auto" else int(a.every)
    cfg = {"warnings": False, "every": every}
    if a.scalars_only:
        cfg["histogram_every"] = 0
    known = {f.name for f in dataclasses.fields(torchdiag.Config)}
    new_cfg = dict(cfg, overview_every=0) if a.scalars_only and "overview_every" in known else dict(cfg)
    if a.without_signals:
        new_cfg.update(attention_rules=False, output_logits_rule=False, adam_epsilon_rule=False,
                       nonfinite_origin=False)
    makers = {"none": lambda m: overhead.NoMonitor(),
              "old": lambda m: torchdiag_old.watch(m, logdir=f"{tmp}/old", config=cfg),
              "new": lambda m: torchdiag.watch(m, logdir=f"{tmp}/new", config=new_cfg)}
    warnings.simplefilter("ignore")
    with contextlib.ExitStack() as stack:
        runs = {}
        for name, make in makers.items():
            m = copy.deepcopy(model)
            runs[name] = (m, torch.optim.SGD(m.parameters(), lr=1e-3), stack.enter_context(make(m)), loss_fn)
        overhead.warm(runs, 5)
        rows = overhead.timed(runs, a.rounds, a.steps)
    print(f"{a.workload}, every={a.every}: none {rows['none']['median_ms']:.1f} ms; " +
          ", ".join(f"{k} {r['ratio']:.3f}x (amortised over all steps {r['amortised']:.3f}x)"
                    for k, r in rows.items() if k != "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
