"""What a watch costs over whole runs, as a user meets it: the default (the time budget), ``every=1`` and the read
floor against no monitoring, on the workloads users bring.

    python benchmarks/budget.py [--workload all|tiny|llama|gpt2|resnet|mlp|cnn|transformer] [--steps 60]
                                [--repeats 3] [--threads 1] [--device cpu|cuda] [--autocast float16|bfloat16]
                                [--quick] [--json out.json] [--parts] [--compile [BACKEND]]

Each repeat trains, for every variant in turn (the order rotates between repeats), a fresh copy of the same model
from the same init for ``--steps`` steps (AdamW; ``torchdiag.watch(model, logdir=...)`` and nothing else for the
default), the watch open for the whole run and closed after it, so that no variant runs beside another's hooks.
``--autocast float16`` runs each forward under ``torch.autocast`` in that dtype (float16: the watch also takes each
output's and gradient's range row, the precision figures). The
ratio is the variant's whole-run time (its first steps, its histogram and overview steps, leaving the watch
included) over the unmonitored run's in the same repeat; the table gives the median over repeats, and for the
default how many steps it recorded. ``--steps 60`` is a run's start; ``--steps 600`` a longer run.

The workloads: a digits-sized MLP (64 -> 4 x 256 -> 10, batch 64), Hugging Face Llama and GPT-2 from configs
(4 x 128, byte vocabulary, context 64, batch 16), a torchvision ResNet-18 (64 x 64 images, batch 16), and the
synthetic ones of ``overhead.py`` (24 x 512 MLP, a small ResNet, a 4 x 256 transformer encoder).

``--compile``: each run's model called through ``torch.compile(model)`` (inductor unless a backend is named), the
read floor as a compiled graph has it (``overhead.CompiledReadFloor``). Each variant trains one copy of the model,
of a class of its own (Dynamo guards the class: no variant runs a graph another traced), its init loaded again
before each run; a warm-up run of each variant compiles its graphs, recorded and not, before anything is timed:
the ratios are a run's time without its compilation.

``--parts``: where the default's cost in a run goes, each part against the unmonitored run's step: opening the
watch, step 0 (its histograms, the TensorBoard layout, the first report text), a recorded step, a step not
recorded (the hooks' checks and ``step()``), closing (the overview images, the writer's last flush).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchdiag  # noqa: E402
from benchmarks import overhead  # noqa: E402


def tiny_workload(device, quick):
    hidden = [m for _ in range(3) for m in (nn.Linear(256, 256), nn.ReLU())]
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), *hidden, nn.Linear(256, 10)).to(device)
    x, y = torch.randn(64, 64, device=device), torch.randint(0, 10, (64,), device=device)
    return model, lambda m: F.cross_entropy(m(x), y)


def _transformers():
    """Hugging Face transformers, importable beside the CPU torch (it imports torchvision when installed)."""
    from tests.helpers.thirdparty import import_torchvision

    import_torchvision()
    import transformers

    return transformers


def _lm(model, device, quick):
    batch, ctx = (2, 16) if quick else (16, 64)
    ids = torch.randint(0, 256, (batch, ctx), device=device)
    return model.to(device), lambda m: m(input_ids=ids, labels=ids).loss


def llama_workload(device, quick):
    tf = _transformers()
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2 if quick else 4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return _lm(tf.LlamaForCausalLM(cfg), device, quick)


def gpt2_workload(device, quick):
    tf = _transformers()
    cfg = tf.GPT2Config(vocab_size=256, n_embd=128, n_layer=2 if quick else 4, n_head=4, n_positions=64)
    return _lm(tf.GPT2LMHeadModel(cfg), device, quick)


def resnet_workload(device, quick):
    from tests.helpers.thirdparty import import_torchvision

    models = import_torchvision().models
    model = models.resnet18(num_classes=10).to(device)
    batch, size = (2, 32) if quick else (16, 64)
    x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 10, (batch,), device=device)
    return model, lambda m: F.cross_entropy(m(x), y)


WORKLOADS: dict[str, Callable] = {
    "tiny": tiny_workload, "llama": llama_workload, "gpt2": gpt2_workload, "resnet": resnet_workload,
    "mlp": overhead.mlp_workload, "cnn": overhead.cnn_workload, "transformer": overhead.transformer_workload}


def variants(logdir: str, compiled: bool = False) -> dict[str, Callable]:
    return {
        "none": lambda m: overhead.NoMonitor(),
        "read floor": overhead.CompiledReadFloor if compiled else overhead.ReadFloor,
        "default": lambda m: torchdiag.watch(m, logdir=tempfile.mkdtemp(dir=logdir)),
        "every=1": lambda m: torchdiag.watch(m, logdir=tempfile.mkdtemp(dir=logdir), every=1),
    }


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass
class RunTimes:
    """One run's clock: the whole of it, opening the monitor, each step, whether the watch recorded it, closing."""

    total: float
    opened: float
    steps: list[float]
    recorded: list[bool]
    closing: float
    watched: bool


def timed_run(model: nn.Module, loss_fn: Callable, monitor: Callable, steps: int, device,
              autocast: torch.dtype | None = None, backend: str | None = None) -> RunTimes:
    """One whole run of ``steps`` steps under ``monitor`` (AdamW, the monitor open for the whole run); with
    ``backend``, the forward through ``torch.compile(model, backend=backend)`` (the watch on the model itself)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = torch.compile(model, backend=backend) if backend else model
    times: list[float] = []
    recorded: list[bool] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sync(device)
        start = time.perf_counter()
        ctx = monitor(model)
        mon = ctx.__enter__()
        opened = time.perf_counter() - start
        watched = isinstance(mon, torchdiag.Watcher)
        for _ in range(steps):
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = loss_fn(forward)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()  # what a training loop's logging does: the host waits for the step
            recorded.append(mon.step() is not None and watched)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        ctx.__exit__(None, None, None)
        _sync(device)
        end = time.perf_counter()
    return RunTimes(end - start, opened, times, recorded, end - t, watched)


def run(model: nn.Module, loss_fn: Callable, monitor: Callable, steps: int, device,
        autocast: torch.dtype | None = None, backend: str | None = None) -> tuple[float, int]:
    """One whole run: (seconds, steps it recorded; -1 for a non-torchdiag monitor)."""
    r = timed_run(model, loss_fn, monitor, steps, device, autocast, backend)
    return r.total, sum(r.recorded) if r.watched else -1


def bench(name: str, steps: int, repeats: int, device, quick: bool, autocast: torch.dtype | None = None,
          backend: str | None = None) -> dict:
    torch.manual_seed(0)
    base, loss_fn = WORKLOADS[name](device, quick)
    out: dict[str, dict] = {}
    if backend:  # every variant's class holds its own graphs of the same forward code: the limit is per code
        dynamo_config = importlib.import_module("torch._dynamo.config")
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    with tempfile.TemporaryDirectory() as logdir:
        vs = variants(logdir, compiled=backend is not None)
        names = list(vs)
        # compiled: a class of its own per variant (Dynamo guards it: no variant runs a graph another traced)
        classes = {v: type(f"{type(base).__name__}_{i}", (type(base),), {}) if backend else type(base)
                   for i, v in enumerate(names)}

        kept: dict[str, nn.Module] = {}
        init = copy.deepcopy(base.state_dict())

        def fresh(v: str) -> nn.Module:
            """The model at its init: a new copy, or compiled, the variant's one copy with its init loaded (a new
            copy is new modules, which a watch's traced hooks look up by identity: Dynamo would compile anew)."""
            if not backend:
                return copy.deepcopy(base)
            if v not in kept:
                kept[v] = copy.deepcopy(base)
                kept[v].__class__ = classes[v]
            kept[v].load_state_dict(init)
            return kept[v]

        if backend:  # warm-up: every variant's graphs, recorded and not (the first steps, then the budget's)
            for v in names:
                run(fresh(v), loss_fn, vs[v], min(steps, 12), device, autocast, backend)
        for _ in range(2):  # warm-up: allocator, first-call costs, the CPU kernel's load
            run(fresh("default"), loss_fn, vs["default"], 3, device, autocast, backend)
            run(fresh("none"), loss_fn, vs["none"], 3, device, autocast, backend)
        times: dict[str, list[float]] = {v: [] for v in names}
        recorded: dict[str, list[int]] = {v: [] for v in names}
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for v in order:
                seconds, rec = run(fresh(v), loss_fn, vs[v], steps, device, autocast, backend)
                times[v].append(seconds)
                recorded[v].append(rec)
    for v in names:
        ratios = [t / n for t, n in zip(times[v], times["none"])]
        out[v] = {"ratio": statistics.median(ratios), "ratios": ratios,
                  "step_ms": 1e3 * statistics.median(times[v]) / steps,
                  "recorded": statistics.median(recorded[v]) if recorded[v][0] >= 0 else None}
    return out


def parts(name: str, steps: int, repeats: int, device, quick: bool) -> str:
    """Where the default's cost in a run goes: opening the watch, step 0, a recorded step, a step not recorded
    and closing, each against the unmonitored run's step (medians over the repeats, runs alternating)."""
    torch.manual_seed(0)
    base, loss_fn = WORKLOADS[name](device, quick)
    got: dict[str, list[RunTimes]] = {"default": [], "none": []}
    with tempfile.TemporaryDirectory() as logdir:
        vs = variants(logdir)
        for _ in range(2):  # warm-up
            for v in got:
                timed_run(copy.deepcopy(base), loss_fn, vs[v], 3, device)
        for r in range(repeats):
            for v in (("default", "none") if r % 2 else ("none", "default")):
                got[v].append(timed_run(copy.deepcopy(base), loss_fn, vs[v], steps, device))
    med = statistics.median
    plain_step = med(t for run_ in got["none"] for t in run_.steps[1:])
    step0 = med(r.steps[0] for r in got["default"]) - med(r.steps[0] for r in got["none"])
    rec = [t for r in got["default"] for t, on in zip(r.steps[1:], r.recorded[1:]) if on]
    other = [t for r in got["default"] for t, on in zip(r.steps[1:], r.recorded[1:]) if not on]
    ms, watched = 1e3, got["default"]
    return (f"{name:12s} step {plain_step * ms:.2f} ms; default: opening {med(r.opened for r in watched) * ms:.2f}"
            f" ms, step 0 +{step0 * ms:.2f} ms, a recorded step +{(med(rec) - plain_step) * ms:.2f} ms"
            f" ({len(rec) / repeats:.0f} a run), a step not recorded +{(med(other) - plain_step) * 1e6:.0f} µs"
            f" ({len(other) / repeats:.0f}), closing {med(r.closing for r in watched) * ms:.2f} ms"
            if rec and other else f"{name}: too few steps to tell recorded from not")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="all", choices=["all", *WORKLOADS])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=["float16", "bfloat16"], default=None,
                   help="each forward under torch.autocast in this dtype")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: proves that it runs")
    p.add_argument("--json")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="call each model through torch.compile (default backend inductor), compiled before timing")
    p.add_argument("--parts", action="store_true",
                   help="the default's cost by part: opening, step 0, a recorded step, a step not recorded, closing")
    a = p.parse_args(argv)
    if a.parts and a.compile:
        p.error("--parts times eager runs: leave out --compile")
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    repeats, steps = (1, min(a.steps, 12)) if a.quick else (a.repeats, a.steps)
    names = list(WORKLOADS) if a.workload == "all" else [a.workload]
    results = {}
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} thread(s); {steps} steps per run, median of"
          f" {repeats} repeat(s); ratio = whole-run time over the unmonitored run's"
          + (f"; autocast {a.autocast}" if a.autocast else "") + (f"; compiled ({a.compile})" if a.compile else ""))
    if a.parts:
        for name in names:
            try:
                print(parts(name, steps, repeats, device, a.quick), flush=True)
            except ImportError as e:
                print(f"{name}: skipped ({e})")
        return 0
    for name in names:
        try:
            res = bench(name, steps, repeats, device, a.quick, getattr(torch, a.autocast) if a.autocast else None,
                        a.compile)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        results[name] = res
        none_ms = res["none"]["step_ms"]
        cells = "  ".join(f"{v} {r['ratio']:.3f}x" + (f" ({r['recorded']:.0f} rec)" if r["recorded"] is not None
                                                       else "") for v, r in res.items() if v != "none")
        print(f"{name:12s} none {none_ms:7.2f} ms/step  {cells}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
