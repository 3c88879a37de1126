"""Overhead of torchdiag against no monitoring, a naive hook recorder and the read floor.

    python benchmarks/overhead.py [--workload mlp|cnn|transformer|all] [--device cpu|cuda]
                                  [--rounds N] [--threads 1] [--json out.json] [--quick]
                                  [--compiled | --no-compiled] [--no-eager] [--backend inductor]

Every variant trains its own deep copy of the model, with its monitor open for the whole run. After a few
warm-up steps each watch is numbered on to step 1000: a watch's first steps (0, 1, 2, 4, 8... up to 100) get
histograms and overview images, and what is timed is a long run's steady state, where one step in 100 does.
Variants run interleaved round by round in one process (these machines are noisy: never compare figures from
two runs): each round is one step of every variant, in a rotating order, and each step's time is divided by
the unmonitored step of its round. Per variant the table gives the median recorded step ("rec"), the median
other step, and the amortised ratio ``(rec + (every - 1) * other) / every`` of the per-round ratios (its "step
ms" is that ratio times the unmonitored median); and the peak memory over a variant's first step of each
round (CPU: peak RSS, reset through /proc/self/clear_refs, so it includes every variant's copy; CUDA:
max_memory_allocated). On CUDA it also counts host syncs during a recorded step
(torch.cuda.set_sync_debug_mode). CPU runs default to 1 torch thread: on a shared 2-core box a busy second core
makes 2-thread timings meaningless.

Compiled (``torch.compile(model)``, default on): every variant gets its own deep copy of the model, compiled
once, with its watch (or hooks) open for the whole run so that rounds interleave without recompiling; ratios are
against the compiled model without monitoring. The graph breaks and graphs Dynamo made while each variant warmed
up come from ``torch._dynamo.utils.counters``. ``--quick`` compiles with ``aot_eager`` (no C++ compile in CI).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchdiag  # noqa: E402
from tests.helpers import zoo  # noqa: E402


# ----------------------------------------------------------------------------- workloads
def mlp_workload(device, quick):
    width, depth, batch = (128, 8, 32) if quick else (512, 24, 256)
    model = zoo.kaiming_mlp(depth, width).to(device)
    model[-1] = nn.Linear(width, 10).to(device)
    x, y = torch.randn(batch, width, device=device), torch.randint(0, 10, (batch,), device=device)
    return model, lambda m: F.cross_entropy(m(x), y)


def _block_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


def _out_of_place(model):
    """The naive recorder's full backward hooks cannot run with in-place ops (ReLU(inplace), out += x):
    every variant runs the out-of-place form, so they all time the same model."""
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
        if isinstance(m, zoo.BasicBlock):
            m.forward = types.MethodType(_block_forward, m)


def cnn_workload(device, quick):
    batch = 8 if quick else 64
    model = zoo.ResNet().to(device)
    _out_of_place(model)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    return model, lambda m: F.cross_entropy(m(x), y)


def transformer_workload(device, quick):
    d, seq, batch, layers = (64, 32, 4, 2) if quick else (256, 128, 16, 4)
    layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.Linear(d, 10)).to(device)
    x, y = torch.randn(batch, seq, d, device=device), torch.randint(0, 10, (batch * seq,), device=device)
    return model, lambda m: F.cross_entropy(m(x).reshape(-1, 10), y)


def resnet_large_workload(device, quick):
    """CUDA only: a ResNet-18-shaped net at 224x224 (ResNet-50-scale activations), bf16 autocast."""
    batch = 4 if quick else 64
    model = zoo.ResNet(widths=(64, 128, 256, 512), blocks=2, classes=1000).to(device)
    _out_of_place(model)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def loss(m):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return F.cross_entropy(m(x), y)
    return model, loss


def gpt_workload(device, quick):
    """CUDA only: GPT-2-small-sized decoder (12 x 768, seq 256), bf16 autocast."""
    layers, d, t, batch = (2, 128, 64, 2) if quick else (12, 768, 256, 8)
    model = zoo.GPT(vocab=50257, d=d, layers=layers, heads=12 if d % 12 == 0 else 4, ctx=t).to(device)
    x = torch.randint(0, 50257, (batch, t), device=device)

    def loss(m):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return F.cross_entropy(m(x).reshape(-1, 50257).float(), x.reshape(-1))
    return model, loss


WORKLOADS = {"mlp": mlp_workload, "cnn": cnn_workload, "transformer": transformer_workload}
CUDA_WORKLOADS = {"resnet_large": resnet_large_workload, "gpt2_small": gpt_workload}


# ----------------------------------------------------------------------------- variants
class _Hooks:
    """A context manager that removes the module hooks a variant registered."""

    def __init__(self):
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *a):
        for h in self.handles:
            h.remove()

    def step(self):
        pass


class NaiveRecorder(_Hooks):
    """What tutorials do: full backward hooks and .item() per statistic per layer."""

    def __init__(self, model):
        super().__init__()
        self.log = {}
        for name, m in model.named_modules():
            if next(m.children(), None) is None:
                self.handles.append(m.register_forward_hook(self._fwd(name)))
                self.handles.append(m.register_full_backward_hook(self._bwd(name)))

    def _fwd(self, name):
        def hook(m, args, out):
            if isinstance(out, torch.Tensor) and torch.is_grad_enabled():
                o = out.detach()
                self.log[name] = (o.mean().item(), o.std().item(), o.abs().max().item())
        return hook

    def _bwd(self, name):
        def hook(m, gin, gout):
            g = gout[0]
            if g is not None:
                self.log[name + ".grad"] = (g.std().item(), g.norm().item())
        return hook


class ReadFloor(_Hooks):
    """One sum over every activation and gradient torchdiag would read: the cost of touching the data once."""

    def __init__(self, model):
        super().__init__()
        self.sink = []
        for m in model.modules():
            if next(m.children(), None) is None or next(m.parameters(recurse=False), None) is not None:
                self.handles.append(m.register_forward_hook(self._fwd))

    def _fwd(self, m, args, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            self.sink.append(out.detach().sum())
            out.register_hook(lambda g: self.sink.append(g.sum()))

    def step(self):
        self.sink.clear()


class NoMonitor(_Hooks):
    pass


_FLOOR = torch.zeros(1)  # the compiled read floor's sink: the graph adds each activation's sum into it
_PROBE = torch.zeros(1, requires_grad=True)  # and autograd each gradient's sum into its .grad


class _TapSum(torch.autograd.Function):
    """An identity whose backward reads the gradient (one ``sum``) as the gradient of ``_PROBE``: nothing is
    mutated in a backward graph (a tensor hook that adds into a global breaks AOT autograd on some models)."""

    @staticmethod
    def forward(ctx, x, probe):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, g.sum().reshape(1)


class CompiledReadFloor(_Hooks):
    """The read floor as a compiled graph can have it: one ``sum`` per activation, added in place into a tensor the
    graph mutates, and one per gradient, through an identity whose backward hands it to autograd (what torchdiag's
    compiled path does with its seven statistics)."""

    def __init__(self, model):
        super().__init__()
        for m in model.modules():
            if next(m.children(), None) is None or next(m.parameters(recurse=False), None) is not None:
                self.handles.append(m.register_forward_hook(self._fwd))

    @staticmethod
    def _fwd(m, args, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            _FLOOR.add_(out.detach().sum().to(_FLOOR.device))
            return _TapSum.apply(out, _PROBE.to(out.device))
        return None


def variants(logdir: str) -> dict[str, Callable[[nn.Module], contextlib.AbstractContextManager]]:
    hist_key = "histogram_every" in {f for f in torchdiag.Config.__dataclass_fields__}
    out = {
        "none": lambda m: NoMonitor(),
        "naive hooks": NaiveRecorder,
        "read floor": ReadFloor,
        "torchdiag every=1": lambda m: torchdiag.watch(m, logdir=f"{logdir}/e1", every=1, config={"warnings": False}),
        "torchdiag every=10": lambda m: torchdiag.watch(m, logdir=f"{logdir}/e10", every=10,
                                                        config={"warnings": False}),
        "torchdiag every=100": lambda m: torchdiag.watch(m, logdir=f"{logdir}/e100", every=100,
                                                         config={"warnings": False}),
    }
    if hist_key:
        out["torchdiag every=1 + histograms"] = lambda m: torchdiag.watch(
            m, logdir=f"{logdir}/h1", every=1, config={"warnings": False, "histogram_every": 1})
    return out


# ----------------------------------------------------------------------------- measurement
def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _recorded(mon) -> bool:
    """Whether the step about to run is recorded (a torchdiag watch); other monitors record every step."""
    rec = getattr(mon, "_recorder", None)  # (a private attribute: the benchmark looks inside)
    return True if rec is None else bool(rec.recording and not rec.closed)


def _every(vname: str) -> int:
    return int(vname.split("every=")[1].split()[0]) if "every=" in vname else 1


def train_step(run, opt, mon, loss_fn) -> float:
    """One step of a variant (forward, backward, optimizer, the monitor's step); its wall time in seconds."""
    t0 = time.perf_counter()
    loss_fn(run).backward()
    opt.step()
    opt.zero_grad()
    mon.step()
    return time.perf_counter() - t0


def timed(runs: dict, rounds: int, steps: int, cuda: bool = False, on_step=None) -> dict[str, dict]:
    """``rounds * steps`` rounds of one step of each variant, in an order that rotates (these machines are noisy:
    pairing each step with the unmonitored one of the same round cancels the drift between rounds). Per variant:
    the median ratio of its recorded steps to the first variant's step of the same round, the same for its other
    steps, and the amortised ratio ``(recorded + (every - 1) * other) / every``; the step times are medians. With
    ``every=1`` one step in 100 is a histogram step (``histogram_every=100``), which the median does not see (the
    ``+ histograms`` variant shows that cost)."""
    names = list(runs)
    base_name = names[0]
    times: dict[str, list[tuple[float, bool]]] = {v: [] for v in names}
    for i in range(rounds * steps):
        k = i % len(names)
        for vname in names[k:] + names[:k]:
            run, opt, mon, loss_fn = runs[vname]
            recorded = _recorded(mon)
            if on_step is not None:
                on_step(vname, i % steps, "begin")
            if cuda:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                train_step(run, opt, mon, loss_fn)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            else:
                dt = train_step(run, opt, mon, loss_fn)
            times[vname].append((dt, recorded))
            if on_step is not None:
                on_step(vname, i % steps, "end")
    base = [t for t, _ in times[base_name]]
    out = {}
    for vname in names:
        rec = [t / b for (t, r), b in zip(times[vname], base) if r]
        other = [t / b for (t, r), b in zip(times[vname], base) if not r]
        r = statistics.median(rec) if rec else None
        o = statistics.median(other) if other else None
        every = _every(vname)
        ratio = (r if r is not None else o) if (r is None or o is None or every == 1) else (r + (every - 1) * o) / every
        rec_ms = [t for t, rr in times[vname] if rr]
        other_ms = [t for t, rr in times[vname] if not rr]
        out[vname] = {"ratio": ratio, "median_ms": ratio * statistics.median(base) * 1e3,
                      # every step's time over the unmonitored variant's, summed: what a run pays, first steps included
                      "amortised": sum(t for t, _ in times[vname]) / sum(base),
                      "recorded_ms": statistics.median(rec_ms) * 1e3 if rec_ms else None,
                      "other_ms": statistics.median(other_ms) * 1e3 if other_ms else None}
    return out


def warm(runs: dict, steps: int) -> None:
    """Warm-up steps, then each watch moved on to step 1000: a watch's first steps (0, 1, 2, 4, 8... up to 100)
    get histograms and overview images, so that a short benchmark would time a run's first minutes; past them,
    one recorded step in 100 does (what a long run sees)."""
    for run, opt, mon, loss_fn in runs.values():
        for _ in range(steps):
            train_step(run, opt, mon, loss_fn)
        _fast_forward(mon, FAST_FORWARD)


FAST_FORWARD = 1000


def _fast_forward(mon, step: int) -> None:
    """Number a watch's next step ``step`` (between two steps; the benchmark looks inside the recorder)."""
    rec = getattr(mon, "_recorder", None)
    if rec is None:
        return
    package = type(rec).__module__.split(".", 1)[0]  # (torchdiag, or an older copy of it: benchmarks/ab.py)
    # the private stage packages, or the public ones or the flat modules of a copy from before them
    mods = sys.modules
    capture = (mods.get(package + "._capture._registry") or mods.get(package + ".capture._registry")
               or mods[package + ".capture"])
    set_recording = capture.set_recording
    histogram_window = (mods.get(package + "._vocab") or mods[package + ".vocab"]).histogram_window

    rec.step = step
    if hasattr(rec, "_hist_step"):  # the last step that got histograms
        rec._hist_step = step - 1
    else:  # (an older copy keeps the window of that step)
        rec._hist_window = histogram_window(step - 1, rec.histogram_every) if rec.histogram_every else -1
    cap = rec.capture
    cadence = getattr(rec, "cadence", None)  # (an older copy has a fixed `every` on the recorder)
    every = cadence.every if cadence is not None else rec.every
    cap.recording = step % (every or 1) == 0
    set_recording(cap, cap.recording and not cap.closed)
    cap.histogram_step = rec._histogram_due()


def run_workload(name: str, device: torch.device, rounds: int, steps: int, quick: bool) -> dict:
    """Eager variants, each on its own copy of the model with its monitor open for the whole run, timed from
    step 1000 on (``warm``): the steady state of a long run."""
    model, loss_fn = {**WORKLOADS, **CUDA_WORKLOADS}[name](device, quick)
    cuda = device.type == "cuda"
    syncs: dict[str, int] = {}
    peaks: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        runs = {}
        for vname, make in variants(tmp).items():
            copy_ = copy.deepcopy(model)
            runs[vname] = (copy_, torch.optim.SGD(copy_.parameters(), lr=1e-3), stack.enter_context(make(copy_)),
                           loss_fn)
        warm(runs, 2 if quick else 5)  # allocator, kernels, TensorBoard import
        state: dict = {}

        def on_step(vname: str, i: int, when: str) -> None:
            """Peak memory over each variant's first step of a round; on CUDA, host syncs in a recorded step."""
            if i != 0:
                return
            if when == "begin":
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                else:
                    _reset_peak_rss()
                if cuda and vname.startswith("torchdiag every=1"):
                    state["ctx"] = warnings.catch_warnings(record=True)
                    state["caught"] = state["ctx"].__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                return
            if "ctx" in state:
                torch.cuda.set_sync_debug_mode(0)
                state.pop("ctx").__exit__(None, None, None)
                syncs[vname] = sum("synchroniz" in str(w.message) for w in state.pop("caught"))
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
            peaks[vname] = max(peaks.get(vname) or 0.0, peak or 0.0) or None

        rows = timed(runs, rounds, steps, cuda, on_step)
    for vname, row in rows.items():
        row["peak_mb"] = peaks.get(vname)
        row["syncs"] = syncs.get(vname)
    return rows


def compiled_variants(logdir: str) -> dict[str, Callable[[nn.Module], contextlib.AbstractContextManager]]:
    cfg = {"warnings": False}
    return {
        "compiled none": lambda m: NoMonitor(),
        "compiled read floor": CompiledReadFloor,
        "compiled torchdiag every=1": lambda m: torchdiag.watch(m, logdir=f"{logdir}/c1", every=1, config=cfg),
        "compiled torchdiag every=10": lambda m: torchdiag.watch(m, logdir=f"{logdir}/c10", every=10, config=cfg),
        "compiled torchdiag every=100": lambda m: torchdiag.watch(m, logdir=f"{logdir}/c100", every=100,
                                                                  config=cfg),
    }


def run_compiled(name: str, device: torch.device, rounds: int, steps: int, quick: bool, backend: str) -> dict:
    """Compiled variants, each on its own compiled copy with its monitor open for the whole run."""
    import torch._dynamo

    model, loss_fn = {**WORKLOADS, **CUDA_WORKLOADS}[name](device, quick)
    cuda = device.type == "cuda"
    counts: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        runs, made = {}, []
        for i, (vname, make) in enumerate(compiled_variants(tmp).items()):
            copy_ = copy.deepcopy(model)
            # a class of its own per variant: Dynamo guards the root's type, never the hooks, so that no variant
            # runs a graph another one traced (a copy of the same model would otherwise reuse it)
            copy_.__class__ = type(f"{type(model).__name__}_{i}", (type(model),), {})
            made.append((vname, copy_, stack.enter_context(make(copy_))))  # every hook in place before tracing
        for vname, copy_, mon in made:
            opt = torch.optim.SGD(copy_.parameters(), lr=1e-3)
            run = torch.compile(copy_, backend=backend)
            c = torch._dynamo.utils.counters
            breaks0, graphs0 = sum(c["graph_break"].values()), c["stats"]["unique_graphs"]
            # warm-up: the recorded graph and (every > 1) the unrecorded one
            warm({vname: (run, opt, mon, loss_fn)}, 3)
            counts[vname] = (sum(c["graph_break"].values()) - breaks0, c["stats"]["unique_graphs"] - graphs0)
            runs[vname] = (run, opt, mon, loss_fn)
        rows = timed(runs, rounds, steps, cuda)
    for vname, row in rows.items():
        row["graph_breaks"], row["graphs"] = counts[vname]
    return rows


def _ms(v: float | None) -> str:
    return f"{v:8.2f}" if v is not None else f"{'-':>8s}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="all", choices=["all", *WORKLOADS, *CUDA_WORKLOADS])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per variant per round (default 10, quick 2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps: proves it runs, asserts nothing")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.compile(model) variants (default on)")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="time the eager variants (default on; --no-eager: the compiled ones only)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor, quick aot_eager)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rounds = a.rounds or (2 if a.quick else 15)
    steps = a.steps or (2 if a.quick else 10)
    device = torch.device(a.device)
    names = (list(WORKLOADS) + (list(CUDA_WORKLOADS) if device.type == "cuda" else [])
             if a.workload == "all" else [a.workload])
    results = {}
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {a.threads} torch thread(s)"
    print(f"torch {torch.__version__}, {what}; {rounds * steps} rounds of one step of each variant, interleaved\n")
    for name in names:
        print(f"{name}:")
        if a.eager:
            rows = run_workload(name, device, rounds, steps, a.quick)
            results[name] = rows
            print(f"  {'variant':32s} {'step ms':>8s} {'ratio':>7s} {'rec ms':>8s} {'other ms':>8s} {'peak MB':>8s}"
                  f" {'syncs':>6s}")
            for vname, r in rows.items():
                peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-"
                syncs = "-" if r["syncs"] is None else str(r["syncs"])
                print(f"  {vname:32s} {r['median_ms']:8.2f} {r['ratio']:7.3f} {_ms(r['recorded_ms'])}"
                      f" {_ms(r['other_ms'])} {peak:>8s} {syncs:>6s}")
        if a.compiled and hasattr(torch, "compile"):
            backend = a.backend or ("aot_eager" if a.quick else "inductor")
            crows = run_compiled(name, device, rounds, steps, a.quick, backend)
            results[name + " compiled"] = crows
            head = f"compiled ({backend})"
            print(f"  {head:32s} {'step ms':>8s} {'ratio':>7s} {'rec ms':>8s} {'other ms':>8s} {'breaks':>8s}"
                  f" {'graphs':>6s}")
            for vname, r in crows.items():
                print(f"  {vname:32s} {r['median_ms']:8.2f} {r['ratio']:7.3f} {_ms(r['recorded_ms'])}"
                      f" {_ms(r['other_ms'])} {r['graph_breaks']:8d} {r['graphs']:6d}")
        print()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
