"""What the instability signals and the non-finite tripwire cost: a training step with no monitoring, with
torchdiag's signals switched off, and with all of them on (attention logits and entropy, output log Z, Adam's
epsilon, loss spikes, the origin tripwire), interleaved round by round in one process.

    python benchmarks/signals_cost.py [--rounds 7] [--steps 10] [--every 1] [--workload tinylm|llama] [--each]

Prints the median step time of each variant and its ratio to no monitoring; "signals" is the on/off ratio.
``--workload llama``: the Hugging Face Llama of ``budget.py`` (4 x 128, context 64, batch 16) instead of the
4-block SDPA language model. ``--each``: also one variant per signal with that signal alone switched off, so that
what each costs is its row against "signals on".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchdiag  # noqa: E402
from examples.attention_logit_growth import TinyLM, batches  # noqa: E402

OFF = {"attention_rules": False, "output_logits_rule": False, "adam_epsilon_rule": False,
       "nonfinite_origin": False}
EACH = tuple(f"without {key}" for key in OFF)  # one signal off, the others on


def _lm(workload: str):
    """(model, batches, loss of a batch) of the workload, at a fixed seed."""
    torch.manual_seed(0)
    if workload == "llama":
        from benchmarks.budget import llama_workload

        model, loss_of = llama_workload(torch.device("cpu"), False)
        return model, None, lambda tokens: loss_of(model)
    model = TinyLM(d=128, depth=4, seq=128)

    def loss_of(tokens):
        out = model(tokens[:, :-1])
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), tokens[:, 1:].reshape(-1))

    return model, batches, loss_of


def run(variant: str, steps: int, every: int, workload: str = "tinylm") -> float:
    model, make_batches, loss_of = _lm(workload)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = list(make_batches(steps + 1, batch=8, seq=128)) if make_batches is not None else [None] * (steps + 1)

    def step(tokens, diag=None):
        loss = loss_of(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if diag is not None:
            diag.step(loss=loss)

    if variant == "none":
        step(data[0])
        t = time.perf_counter()
        for tokens in data[1:]:
            step(tokens)
        return (time.perf_counter() - t) / steps
    keys = OFF if variant == "signals off" else {variant[len("without "):]: False} if variant in EACH else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, optimizer=opt, every=every, **keys) as diag:
            step(data[0], diag)
            t = time.perf_counter()
            for tokens in data[1:]:
                step(tokens, diag)
            return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workload", choices=("tinylm", "llama"), default="tinylm")
    parser.add_argument("--each", action="store_true", help="also each signal alone switched off")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ("none", "signals off", "signals on") + (EACH if args.each else ())
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:  # (the order rotating)
            times[v].append(run(v, args.steps, args.every, args.workload))
    base = statistics.median(times["none"])
    what = ("Hugging Face Llama 4 x 128, context 64, batch 16" if args.workload == "llama"
            else "TinyLM d 128, 4 blocks, seq 128, batch 8")
    print(f"{what}, AdamW, every={args.every}, {args.rounds} rounds x {args.steps} steps, {args.threads} thread(s)")
    print("| variant | median step (ms) | ratio to none |\n| --- | --- | --- |")
    for v in variants:
        m = statistics.median(times[v])
        print(f"| {v} | {m * 1e3:.1f} | {m / base:.3f} |")
    on = [a / b for a, b in zip(times["signals on"], times["signals off"])]
    print(f"signals on / off, paired per round: median {statistics.median(on):.3f} (min {min(on):.3f},"
          f" max {max(on):.3f})")


if __name__ == "__main__":
    main()
