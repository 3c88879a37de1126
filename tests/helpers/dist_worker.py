"""One rank of the distributed tests: ``python tests/helpers/dist_worker.py SCENARIOS RANK WORLD PORT OUTDIR``.

Joins a gloo process group on 127.0.0.1, runs each scenario (comma-separated) in turn and saves what
it saw (its own inputs and weights, and torchdiag's reports) to ``OUTDIR/<scenario>_rank<RANK>.pt``;
``tests/unit/reduce/test_distributed.py`` compares them with statistics it computes itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

import torchdiag


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def ddp_batches(rank: int, steps: int) -> list[torch.Tensor]:
    """Different data per rank: different sizes, scales and means (a mean of per-rank stds would be wrong)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(5 + 6 * rank, 8, generator=gen) * (1 + 2 * rank) + 3 * rank for _ in range(steps)]


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


CLIP = 0.05


def scenario_ddp(rank: int, world: int, outdir: str, defer: str = "never") -> dict:
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    xs = ddp_batches(rank, 3)
    weights, reports = [], {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # every=2 and three optimizer steps: steps 0 and 2 are recorded, on every rank
        with torchdiag.watch(ddp, logdir=f"{outdir}/tb_{defer}_rank{rank}", optimizer=opt, every=2,
                             config={"dead_fraction": 0.3, "histogram_every": 1, "defer_report": defer}) as diag:
            for x in xs:
                weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                loss_of(ddp(x)).backward()
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)
                opt.step()
                opt.zero_grad()
                r = diag.step()
                if r is not None:
                    reports[r.step] = r.to_dict()
        final = diag.report().to_dict()
    weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    diag_warnings = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    return {"xs": xs, "weights": weights, "reports": reports, "final": final, "warnings": diag_warnings}


def scenario_ddp_deferred(rank: int, world: int, outdir: str) -> dict:
    """The same run with each step's reduction deferred to the next step's end (as on a GPU)."""
    return scenario_ddp(rank, world, outdir, defer="always")


class Branchy(nn.Module):
    """``b`` runs only when asked: a conditional branch that one rank takes and the other does not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = self.a(x)
        if use_b:
            h = self.b(h)
        return self.c(h)


def branch_batches(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7 + rank)
    return [torch.randn(3 + 4 * rank, 4, generator=gen) * (1 + rank) - rank for _ in range(3)]


def scenario_branch(rank: int, world: int, outdir: str) -> dict:
    model = Branchy()
    xs = branch_batches(rank)
    reports = {}
    with torchdiag.watch(model, config={"warnings": False}) as diag:
        # step 0: rank 1 takes the branch, rank 0 does not
        model(xs[0], use_b=rank == 1).sum().backward()
        reports[0] = diag.step().to_dict()
        # step 1: rank 1 runs nothing at all, but ends the step like every rank
        if rank == 0:
            model(xs[1], use_b=True).sum().backward()
        r = diag.step()
        reports[1] = r.to_dict() if r is not None else None
        # step 2: nobody runs anything: the step is empty everywhere (no report), and nothing hangs
        reports[2] = diag.step()
        # step 3: both again, left pending: the end of the `with` reduces it on every rank
        model(xs[2], use_b=True).sum().backward()
    reports[3] = diag.report().to_dict()
    # a `with` left by an exception (here on every rank): no collective at exit, this rank's own numbers
    try:
        with torchdiag.watch(model, config={"warnings": False}) as diag:
            model(xs[0], use_b=True).sum().backward()
            raise KeyError("boom")
    except KeyError:
        pass
    return {"xs": xs, "reports": reports, "raised": diag.report().to_dict()}


def scenario_steps(rank: int, world: int, outdir: str) -> dict:
    """Ranks that count steps differently (here every=1 against every=2) are told so, on every rank."""
    model = Branchy()
    x = branch_batches(rank)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # rank 0 reduces at steps 0, 1 and 2 (exit); rank 1 at 0, 2 and 4 (exit): three collectives each
        with torchdiag.watch(model, every=1 + rank, config={"warnings": False}) as diag:
            for _ in range(2 + 2 * rank):
                model(x, use_b=True).sum().backward()
                diag.step()
        # ranks that watch different models: told so once, then each reports its own numbers
        other = model if rank == 0 else nn.Sequential(nn.Linear(4, 2))
        with torchdiag.watch(other, config={"warnings": False}) as diag:
            if rank == 0:
                other(x, use_b=False)
            else:
                other(x)
            own = diag.step().to_dict()
    return {"warnings": [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)],
            "own": own, "x": x, "other": other.state_dict()}


def scenario_every(rank: int, world: int, outdir: str) -> dict:
    """Ranks with a different `every` (1 and 3) over 4 steps: told at the first recorded step, no collective after."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    x = torch.randn(3 + rank, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=1 + 2 * rank, config={"warnings": False}) as diag:
            for _ in range(4):
                model(x).sum().backward()
                diag.step()
        report = diag.report().to_dict()
    return {"warnings": [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)],
            "report": report, "x": x, "state": model[0].state_dict()}


def scenario_budget(rank: int, world: int, outdir: str) -> dict:
    """The default time budget over 60 DDP steps, rank 1 slower by a sleep in its step: the ranks' clocks differ,
    and they must still record the same steps (each one runs a collective)."""
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    xs = ddp_batches(rank, 60)
    recorded, reports = [], {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(ddp, optimizer=opt, config={"warnings": False}) as diag:
            for x in xs:
                loss_of(ddp(x)).backward()
                opt.step()
                opt.zero_grad()
                if rank == 1:
                    time.sleep(0.002)
                r = diag.step()
                if r is not None:
                    recorded.append(r.step)
                    reports[r.step] = r.to_dict()
    return {"recorded": recorded, "reports": reports,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]}


def scenario_rules(rank: int, world: int, outdir: str) -> dict:
    """attention_rules on rank 0 and off on rank 1, over an attention model: told at the first recorded step, no
    collective after it (each rank would pack a different vector of signals)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16))
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 6, 8)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(nn.ModuleDict({"proj": model, "attn": attn}), every=1,
                             config={"warnings": False, "attention_rules": rank == 0}) as diag:
            for _ in range(3):
                h = model(x)
                attn(h, h, h)[0].sum().backward()
                diag.step()
    return {"warnings": [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)],
            "seconds": time.monotonic() - start}


def scenario_signals(rank: int, world: int, outdir: str) -> dict:
    """Attention figures and log Z under DDP: every rank reports the same, reduced across ranks."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        attn.in_proj_weight[:32] *= 3.0
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), Attend(attn), nn.Linear(16, 5)))
    torch.manual_seed(100 + rank)
    x, y = torch.randn(2, 12, 8) * (1 + rank), torch.randint(0, 5, (2, 12))
    with torchdiag.watch(model, config={"warnings": False}) as diag:
        torch.nn.functional.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)).backward()
        report = diag.step().to_dict()
    return {"report": report, "x": x, "state": model.module.state_dict()}


class Attend(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn(h, h, h, need_weights=False)[0]


def _diag_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]


def scenario_uneven(rank: int, world: int, outdir: str) -> dict:
    """Issue #14 item 8: rank 1 calls step() more often. every=2: rank 0 records steps 0 and 2 and leaves at step
    3 (not recorded: no collective at exit); rank 1 also records step 4, which rank 0 never joins. Then the same
    with rank 0 still inside its `with` (busy for 2 timeouts) instead of gone: only the timeout can tell."""
    model = Branchy()
    x = branch_batches(rank)[0]
    out: dict = {"x": x, "state": model.state_dict()}
    for part, linger in (("gone", 0.0), ("busy", 2 * float(os.environ.get("TORCHDIAG_DIST_TIMEOUT", "60")))):
        reports = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.monotonic()
            with torchdiag.watch(model, every=2, config={"warnings": False}) as diag:
                for _ in range(3 + 2 * rank):
                    model(x, use_b=True).sum().backward()
                    r = diag.step()
                    if r is not None:
                        reports[r.step] = r.to_dict()
                if rank == 0:
                    time.sleep(linger)
            elapsed = time.monotonic() - start
        out[part] = {"reports": reports, "warnings": _diag_warnings(caught), "elapsed": elapsed}
    return out


def scenario_raised(rank: int, world: int, outdir: str) -> dict:
    """Issue #14 item 8: rank 0 leaves its `with` by an exception at step 2 and carries on training (DDP); rank 1
    goes on watching. torchdiag's collectives must neither hang rank 1 nor disturb DDP's allreduce."""
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    xs = ddp_batches(rank, 4)
    reports, weights = {}, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        done = 0
        try:
            with torchdiag.watch(ddp, config={"warnings": False}) as diag:
                for x in xs:
                    weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                    loss_of(ddp(x)).backward()
                    opt.step()
                    opt.zero_grad()
                    done += 1
                    if rank == 0 and done == 3:
                        raise RuntimeError("a failure on rank 0 only")
                    r = diag.step()
                    if r is not None:
                        reports[r.step] = r.to_dict()
        except RuntimeError:
            pass
        for x in xs[done:]:  # rank 0 goes on training, unwatched
            loss_of(ddp(x)).backward()
            opt.step()
            opt.zero_grad()
        elapsed = time.monotonic() - start
    return {"reports": reports, "warnings": _diag_warnings(caught), "elapsed": elapsed, "xs": xs,
            "weights": weights, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def scenario_unwatched(rank: int, world: int, outdir: str) -> dict:
    """Issue #14 item 8: rank 0 trains (DDP) without ever watching; rank 1 watches."""
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    xs = ddp_batches(rank, 3)
    reports = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        with torchdiag.watch(ddp, config={"warnings": False}) if rank == 1 else contextlib.nullcontext() as diag:
            for x in xs:
                loss_of(ddp(x)).backward()
                opt.step()
                opt.zero_grad()
                if diag is not None:
                    reports[diag.step_count - 1] = diag.step().to_dict()
        elapsed = time.monotonic() - start
    return {"reports": reports, "warnings": _diag_warnings(caught), "elapsed": elapsed,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def scenario_groups(rank: int, world: int, outdir: str) -> dict:
    # new_group must be called by every rank, for every group, in the same order
    pair = dist.new_group([0, 1])
    solo = [dist.new_group([r]) for r in range(world)]
    only0 = dist.new_group([0])
    xs = branch_batches(rank)
    out: dict = {"xs": xs}
    model = Branchy()
    with torchdiag.watch(model, process_group=pair, config={"warnings": False}) as diag:
        model(xs[0], use_b=True).sum().backward()
        out["pair"] = diag.step().to_dict()
    with torchdiag.watch(model, process_group=solo[rank], logdir=f"{outdir}/solo_rank{rank}",
                         config={"warnings": False}) as diag:
        model(xs[0], use_b=True).sum().backward()
        out["solo"] = diag.step().to_dict()
    try:
        torchdiag.watch(model, process_group=only0)
        out["only0"] = "ok"
    except torchdiag.TorchDiagError as e:
        out["only0"] = f"TorchDiagError: {e}"
    dist.barrier()
    return out


def scenario_fsdp(rank: int, world: int, outdir: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(200 + rank)
    # equal local batches: FSDP's mean over ranks of each rank's mean loss is then the global mean loss
    xs = [torch.randn(6, 8, generator=gen) * (1 + rank) + rank for _ in range(2)]
    reports = {}
    with torchdiag.watch(model, optimizer=opt, config={"warnings": False}) as diag:
        for x in xs:
            loss_of(model(x)).backward()
            opt.step()
            opt.zero_grad()
            reports[diag.step_count - 1] = diag.step().to_dict()
    names = [n for n, _ in model.named_modules()]
    return {"xs": xs, "reports": reports, "names": names,
            "sharded": type(model[0].weight).__name__}


def main() -> None:
    scenarios, rank, world, port, outdir = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name in scenarios:
            result = globals()[f"scenario_{name}"](rank, world, outdir)
            torch.save(result, f"{outdir}/{name}_rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
