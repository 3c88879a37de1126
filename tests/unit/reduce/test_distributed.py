"""torch.distributed: real 2-rank gloo process groups on 127.0.0.1, checked against statistics computed here.

The ranks run ``tests/helpers/dist_worker.py`` (one subprocess per rank, a free port, a timeout, always killed);
each saves its own inputs, weights and torchdiag's reports, and the tests recompute every figure from
those inputs over the concatenated global batch, with plain torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import torchdiag
from tests.helpers import dist_worker as W
from torchdiag._layers.taxonomy import Slot
from torchdiag._reduce import distributed
from torchdiag._reduce.accumulators import MomentAccumulator
from torchdiag._stats import stats
from torchdiag._stats.stepbuffer import Decoded, reduction_layout
from torchdiag._vocab import Row

ACT, GRAD = Row.ACT, Row.GRAD

ROOT = Path(__file__).resolve().parents[3]
WORLD = 2
TIMEOUT = 120

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")


def _fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenarios: list[str], outdir: Path, env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> None:
    """Both ranks as subprocesses; killed on timeout or failure, never left behind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    port = free_port()
    worker = str(ROOT / "tests" / "helpers" / "dist_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, ",".join(scenarios), str(r),
                               str(WORLD), str(port), str(outdir)], env=env, cwd=str(outdir),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    outputs = [""] * WORLD
    deadline = time.monotonic() + timeout
    try:
        for r, p in enumerate(procs):
            outputs[r] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks did not finish within {timeout:g} s (a collective hung?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{outputs[r][-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank run of every scenario (one process pair keeps the file fast); results per rank."""
    outdir = tmp_path_factory.mktemp("dist")
    scenarios = ["ddp", "ddp_deferred", "branch", "groups", "steps", "every", "signals", "budget", "rules"]
    scenarios += ["fsdp"] if _fsdp2() else []
    run_ranks(scenarios, outdir)
    results = {s: [torch.load(outdir / f"{s}_rank{r}.pt", weights_only=False) for r in range(WORLD)]
               for s in scenarios}
    results["outdir"] = outdir
    return results


# ------------------------------------------------------------------ independent reference
def capture(model: nn.Module, x: torch.Tensor, loss_fn, **kw) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each module's output and the gradient at it, and each weighted module's input, for one forward."""
    outs, grads, ins = {}, {}, {}
    names = {m: n for n, m in model.named_modules() if n}

    def hook(module, args, out):
        name = names[module]
        outs[name] = out.detach().clone()
        ins[name] = args[0].detach().clone()
        out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        loss_fn(model(x, **kw)).backward()
    finally:
        for h in handles:
            h.remove()
    return {n: (outs[n], grads.get(n), ins[n]) for n in outs}


def pooled(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1).double() for p in parts])


def close(a, b, rel=1e-5, abs_=1e-9):
    return a == pytest.approx(b, rel=rel, abs=abs_)


def check_layer(layer: dict, outs: list[torch.Tensor], grads: list[torch.Tensor] | None = None,
                ins: list[torch.Tensor] | None = None) -> None:
    y = pooled(outs)
    # float32 sums on the device: a mean near zero is good to ~1e-7 of the values' scale, not of itself
    assert close(layer["act_mean"], y.mean().item(), abs_=1e-6 * y.abs().max().item()), (layer["name"], "act_mean")
    assert close(layer["act_std"], y.std(unbiased=False).item()), (layer["name"], "act_std")
    assert close(layer["act_absmax"], y.abs().max().item()), (layer["name"], "act_absmax")
    if layer["module_type"] == "ReLU" or layer["zero_fraction"] is not None:
        assert close(layer["zero_fraction"], (y == 0).double().mean().item()), (layer["name"], "zero_fraction")
    if grads is not None:
        assert close(layer["grad_std"], pooled(grads).std(unbiased=False).item(), rel=1e-4), (layer["name"], "grad")
    if ins is not None:
        rms_in = pooled(ins).pow(2).mean().sqrt().item()
        assert close(layer["gain"], y.std(unbiased=False).item() / rms_in, rel=1e-4), (layer["name"], "gain")


# ------------------------------------------------------------------ DDP
def test_ddp_attention_and_logit_figures_are_reduced_across_ranks(runs):
    r0, r1 = runs["signals"]
    assert r0["report"] == r1["report"]
    rows = {la["name"]: la for la in r0["report"]["layers"]}
    sd = r0["state"]
    tops, ents, logzs = [], [], []
    ref = nn.Sequential(nn.Linear(8, 16), W.Attend(nn.MultiheadAttention(16, 2, batch_first=True)), nn.Linear(16, 5))
    ref.load_state_dict(sd)
    for r in (r0, r1):  # each rank's own figures, by hand from its batch
        h = r["x"] @ sd["0.weight"].T + sd["0.bias"]
        w, b = sd["1.attn.in_proj_weight"], sd["1.attn.in_proj_bias"]
        q = (h @ w[:16].T + b[:16]).view(2, 12, 2, 8).transpose(1, 2)
        k = (h @ w[16:32].T + b[16:32]).view(2, 12, 2, 8).transpose(1, 2)
        z = q @ k.transpose(-1, -2) / math.sqrt(8)
        p = z.softmax(-1)
        tops.append(z.max().item())
        ents.append((-(p * p.clamp(min=1e-30).log()).sum(-1) / math.log(12)).mean().item())
        with torch.no_grad():
            logzs.append(torch.logsumexp(ref(r["x"]), dim=-1).mean().item())
    assert rows["1.attn"]["attention_logit_max"] == pytest.approx(max(tops), rel=1e-4)  # the largest of any rank
    assert rows["1.attn"]["attention_entropy"] == pytest.approx(sum(ents) / 2, rel=1e-4)  # the mean over ranks
    assert rows["2"]["output_logz"] == pytest.approx(sum(logzs) / 2, rel=1e-4)


def test_ddp_global_statistics_equal_those_of_the_concatenated_batch(runs):
    r0, r1 = runs["ddp"]
    assert sorted(r0["reports"]) == [0, 2]  # every=2, three optimizer steps: the same recorded steps on each rank
    for step in (0, 2):
        rep0, rep1 = r0["reports"][step], r1["reports"][step]
        assert rep0 == rep1  # every rank ends with the same report
        assert [la["name"] for la in rep0["layers"]] == ["0", "1", "2", "3", "4"]  # no 'module.' prefix
        before, after = r0["weights"][step], r0["weights"][step + 1]
        ref = W.mlp()
        ref.load_state_dict(before)
        caps = [capture(ref, r["xs"][step], W.loss_of) for r in (r0, r1)]  # each rank's own loss, as DDP runs it
        for layer in rep0["layers"]:
            name = layer["name"]
            weighted = isinstance(ref.get_submodule(name), nn.Linear)
            check_layer(layer, [c[name][0] for c in caps], [c[name][1] for c in caps],
                        [c[name][2] for c in caps] if weighted else None)
            assert layer["calls"] == 1  # per rank, not summed over ranks
            if weighted:
                w0, w1 = before[f"{name}.weight"].double(), after[f"{name}.weight"].double()
                assert close(layer["weight_std"], w1.std(unbiased=False).item())
                assert close(layer["update_ratio"], ((w1 - w0).norm() / w0.norm()).item(), rel=1e-4)
        # the pre-clip norm is that of DDP's averaged gradient (not of either rank's local one)
        ref.zero_grad()
        for r in (r0, r1):
            (W.loss_of(ref(r["xs"][step])) / WORLD).backward()
        norm = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).norm().item()
        assert close(rep0["grad_norm_preclip"], norm, rel=1e-4)
        assert close(rep0["grad_norm_postclip"], W.CLIP, rel=1e-4) and rep0["clipped"] is True
    assert r0["final"] == r1["final"] == r0["reports"][2]  # the step left at exit (3) was not recorded


def test_ddp_pooling_is_not_an_average_of_per_rank_figures(runs):
    """The check above can tell pooled statistics from a per-rank average (the data differ per rank)."""
    r0, r1 = runs["ddp"]
    ref = W.mlp()
    ref.load_state_dict(r0["weights"][0])
    outs = [capture(ref, r["xs"][0], W.loss_of)["0"][0] for r in (r0, r1)]
    naive = sum(o.std(unbiased=False).item() for o in outs) / 2
    reported = r0["reports"][0]["layers"][0]["act_std"]
    assert abs(reported - naive) > 0.1 * reported
    assert reported != pytest.approx(outs[0].std(unbiased=False).item(), rel=0.05)


def test_ddp_rank0_alone_writes_and_warns(runs):
    r0, r1 = runs["ddp"]
    assert any("'1' (ReLU) is dead" in w for w in r0["warnings"]), r0["warnings"]
    assert r1["warnings"] == []
    assert "dead" in r1["reports"][0]["layers"][1]["status"]  # rank 1 still has the finding, it just stays quiet
    outdir = runs["outdir"]
    assert not (outdir / "tb_never_rank1").exists()  # no writer opened, no directory created
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(outdir / "tb_never_rank0"), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    act_std = {e.step: 10 ** e.value for e in acc.Scalars("log10_act_std/0")}  # layer_scalars: core
    assert sorted(act_std) == [0, 2]
    assert act_std[2] == pytest.approx(r0["reports"][2]["layers"][0]["act_std"], rel=1e-5)
    assert "act/0" in acc.Tags()[ea.HISTOGRAMS]  # rank 0's own histograms


def test_deferred_reduction_gives_the_same_reports_one_step_later(runs):
    """defer_report (what a GPU gets by default): each rank reduces step N when step N + 1 ends, in the same
    order on every rank; the reports equal the immediate ones."""
    n0, (d0, d1) = runs["ddp"][0], runs["ddp_deferred"]
    assert sorted(d0["reports"]) == [0]  # step 0 came out of the optimizer step of step 1; step 2 at exit
    assert d0["reports"][0] == d1["reports"][0] == n0["reports"][0]
    assert d0["final"] == d1["final"] == n0["reports"][2]
    assert d0["warnings"] == n0["warnings"] and d1["warnings"] == []


# ------------------------------------------------------------------ ranks that ran different layers, or nothing
def test_branch_taken_on_one_rank_only(runs):
    r0, r1 = runs["branch"]
    rep = r0["reports"][0]
    assert rep == r1["reports"][0]
    assert [(la["name"], la["index"]) for la in rep["layers"]] == [("a", 0), ("b", 1), ("c", 2)]
    assert not any("never called" in n for n in rep["notes"])
    model = W.Branchy()
    c0 = capture(model, r0["xs"][0], torch.sum, use_b=False)
    c1 = capture(model, r1["xs"][0], torch.sum, use_b=True)
    by = {la["name"]: la for la in rep["layers"]}
    check_layer(by["a"], [c0["a"][0], c1["a"][0]], [c0["a"][1], c1["a"][1]], [c0["a"][2], c1["a"][2]])
    check_layer(by["b"], [c1["b"][0]], [c1["b"][1]], [c1["b"][2]])  # rank 1's alone
    check_layer(by["c"], [c0["c"][0], c1["c"][0]], [c0["c"][1], c1["c"][1]], [c0["c"][2], c1["c"][2]])
    assert close(by["b"]["weight_std"], model.b.weight.double().std(unbiased=False).item())


def test_a_rank_that_ran_nothing_still_joins_the_step(runs):
    r0, r1 = runs["branch"]
    model = W.Branchy()
    # step 1: rank 1 ran no forward; both ranks hold rank 0's numbers
    assert r0["reports"][1] == r1["reports"][1]
    c0 = capture(model, r0["xs"][1], torch.sum, use_b=True)
    for layer in r0["reports"][1]["layers"]:
        n = layer["name"]
        check_layer(layer, [c0[n][0]], [c0[n][1]], [c0[n][2]])
    # step 2: no rank ran anything: no report anywhere; step 3 (left pending) is reduced at the end of the with
    assert r0["reports"][2] is None and r1["reports"][2] is None
    rep3 = r0["reports"][3]
    assert rep3 == r1["reports"][3] and rep3["step"] == 3
    caps = [capture(model, r["xs"][2], torch.sum, use_b=True) for r in (r0, r1)]
    for layer in rep3["layers"]:
        n = layer["name"]
        check_layer(layer, [c[n][0] for c in caps], [c[n][1] for c in caps])


def test_an_exception_inside_the_watch_runs_no_collective(runs):
    model = W.Branchy()
    for res in runs["branch"]:
        rep = res["raised"]
        assert rep["step"] == 0 and [la["name"] for la in rep["layers"]] == ["a", "b", "c"]
        c = capture(model, res["xs"][0], torch.sum, use_b=True)
        for layer in rep["layers"]:  # this rank's own numbers
            check_layer(layer, [c[layer["name"]][0]])


def test_ranks_at_different_steps_are_warned(runs):
    for res in runs["steps"]:
        assert len([w for w in res["warnings"] if "different steps" in w]) == 1, res["warnings"]


def test_ranks_with_a_different_every_are_told_at_the_first_step_and_never_hang(runs):
    # issue #14 item 7: every=1 on rank 0 and every=3 on rank 1 over 4 steps: rank 0 would run 4 collectives
    # (+1 at exit) and rank 1 two: the layout check did not cover it and the job hung until the group timeout
    for res in runs["every"]:
        told = [w for w in res["warnings"] if "different steps" in w]
        assert len(told) == 1, res["warnings"]
        assert "every: rank 0 1, rank 1 3" in told[0]
        # each rank reports its own numbers of its last recorded step
        assert res["report"]["step"] == 3
        lin = nn.Linear(4, 2)
        lin.load_state_dict(res["state"])
        check_layer(res["report"]["layers"][0], [lin(res["x"]).detach()])


def test_ranks_with_different_signal_rules_are_told_at_the_first_step_and_never_wait(runs):
    # issue #28 item 16: attention_rules on one rank only: each rank would reduce a different vector of signals, wait
    # out the timeout and blame a slow rank; the first recorded step's agreement names the key instead
    for res in runs["rules"]:
        told = [w for w in res["warnings"] if "reduce different figures" in w]
        assert len(told) == 1, res["warnings"]
        assert "attention_rules: rank 0 1, rank 1 0" in told[0]
        assert not [w for w in res["warnings"] if "no answer within" in w or "not every rank joined" in w]
        assert res["seconds"] < 30  # no collective timed out (TORCHDIAG_DIST_TIMEOUT is 60 s by default)


# ------------------------------------------------------------------ a rank missing at a later step (issue #14 item 8)
MISSING_TIMEOUT = 2.0  # TORCHDIAG_DIST_TIMEOUT of these runs: a rank that is not there is found within seconds


def missing(scenario: str, tmp_path: Path) -> list[dict]:
    """Ranks that break the precondition, one process pair per scenario. Before the fix each of these hung until
    the group timeout (30 min), or gloo aborted a rank at the next allreduce of the user's group ("Received data
    size doesn't match expected size"): torchdiag's extra collective had shifted that group's sequence."""
    run_ranks([scenario], tmp_path, env={"TORCHDIAG_DIST_TIMEOUT": str(MISSING_TIMEOUT)}, timeout=60)
    return [torch.load(tmp_path / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _own(report: dict, x: torch.Tensor, state: dict) -> None:
    """``report`` holds this rank's own numbers for the Branchy model on ``x``."""
    model = W.Branchy()
    model.load_state_dict(state)
    c = capture(model, x, torch.sum, use_b=True)
    for layer in report["layers"]:
        check_layer(layer, [c[layer["name"]][0]])


def test_a_rank_that_steps_more_often_is_told_which_rank_left(tmp_path):
    r0, r1 = missing("uneven", tmp_path)
    # rank 0 left after step 2: rank 1's step 4 fails at once (rank 0's side of torchdiag's group is closed)
    gone = r1["gone"]
    assert len(gone["warnings"]) == 1, gone["warnings"]
    assert "rank 0 ended its watch after step 2" in gone["warnings"][0] and "at step 4" in gone["warnings"][0]
    assert sorted(gone["reports"]) == [0, 2, 4] and gone["elapsed"] < 10
    assert any("rank 1 only" in n for n in gone["reports"][4]["notes"])
    assert not any("only" in n for n in gone["reports"][2]["notes"])
    _own(gone["reports"][4], r1["x"], r1["state"])  # rank 1's own numbers, not a mix with a stale step
    assert r0["gone"]["warnings"] == [] and sorted(r0["gone"]["reports"]) == [0, 2]
    # rank 0 still inside its `with` but not stepping: told after the timeout, naming rank 0
    busy = r1["busy"]
    assert len(busy["warnings"]) == 1, busy["warnings"]
    assert f"rank 0: no answer within {MISSING_TIMEOUT:g} s" in busy["warnings"][0]
    assert "TORCHDIAG_DIST_TIMEOUT" in busy["warnings"][0]
    assert sorted(busy["reports"]) == [0, 2, 4] and any("rank 1 only" in n for n in busy["reports"][4]["notes"])
    _own(busy["reports"][4], r1["x"], r1["state"])
    assert r0["busy"]["warnings"] == []


def test_a_rank_that_leaves_by_an_exception_and_trains_on_hangs_nobody(tmp_path):
    r0, r1 = missing("raised", tmp_path)
    assert len(r1["warnings"]) == 1, r1["warnings"]
    assert "rank 0 left its watch by an exception (RuntimeError) after step 1" in r1["warnings"][0]
    assert "at step 2" in r1["warnings"][0] and r1["elapsed"] < 10
    assert sorted(r1["reports"]) == [0, 1, 2, 3]
    assert all(any("rank 1 only" in n for n in r1["reports"][s]["notes"]) for s in (2, 3))
    assert r0["warnings"] == [] and sorted(r0["reports"]) == [0, 1]
    # DDP's allreduce was never disturbed by torchdiag's collectives: both ranks hold the same weights
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    # from step 2 on rank 1 reports its own numbers (its batch only)
    model = W.mlp()
    for s in (2, 3):
        model.load_state_dict(r1["weights"][s])
        c = capture(model, r1["xs"][s], W.loss_of)
        for layer in r1["reports"][s]["layers"]:
            check_layer(layer, [c[layer["name"]][0]], [c[layer["name"]][1]])


def test_a_rank_that_never_watches_is_named_within_the_timeout(tmp_path):
    r0, r1 = missing("unwatched", tmp_path)
    assert len(r1["warnings"]) == 1, r1["warnings"]
    assert "rank 0 is not watching" in r1["warnings"][0] and "at step 0" in r1["warnings"][0]
    assert MISSING_TIMEOUT <= r1["elapsed"] < MISSING_TIMEOUT + 10
    assert sorted(r1["reports"]) == [0, 1, 2]
    assert all(any("rank 1 only" in n for n in rep["notes"]) for rep in r1["reports"].values())
    for k, v in r0["state"].items():  # the user's DDP went on, in step
        assert torch.equal(v, r1["state"][k]), k


def test_ranks_watching_different_models_are_warned_and_report_their_own(runs):
    r0, r1 = runs["steps"]
    for res in (r0, r1):
        assert len([w for w in res["warnings"] if "watch different modules" in w]) == 1, res["warnings"]
    assert [la["name"] for la in r0["own"]["layers"]] == ["a", "c"]
    assert [la["name"] for la in r1["own"]["layers"]] == ["0"]
    lin = nn.Linear(4, 2)
    lin.load_state_dict({k.removeprefix("0."): v for k, v in r1["other"].items()})
    check_layer(r1["own"]["layers"][0], [lin(r1["x"]).detach()])


# ------------------------------------------------------------------ process_group=
def test_process_group_argument(runs):
    r0, r1 = runs["groups"]
    # a two-rank group given explicitly: reduced over it
    assert r0["pair"] == r1["pair"]
    model = W.Branchy()
    caps = [capture(model, r["xs"][0], torch.sum, use_b=True) for r in (r0, r1)]
    for layer in r0["pair"]["layers"]:
        check_layer(layer, [c[layer["name"]][0] for c in caps])
    # a one-rank group each: each rank its own numbers, and each is rank 0 of its group, so each writes
    for r, res in enumerate((r0, r1)):
        for layer in res["solo"]["layers"]:
            check_layer(layer, [caps[r][layer["name"]][0]])
        assert list((runs["outdir"] / f"solo_rank{r}").glob("events.out.tfevents.*"))
    # a rank outside the group it is given: a clear error from watch()
    assert r0["only0"] == "ok"
    assert r1["only0"].startswith("TorchDiagError") and "not a member" in r1["only0"]


# ------------------------------------------------------------------ FSDP2
@pytest.mark.skipif(not _fsdp2(), reason="torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6")
def test_fsdp2_reports_the_numbers_of_an_unsharded_run(runs):
    r0, r1 = runs["fsdp"]
    assert r0["sharded"] == "DTensor"  # the parameters really were sharded
    assert r0["names"] == ["", "0", "1", "2", "3", "4"]
    # the same model, unsharded, one process, on the concatenated batch with the global mean loss
    ref = W.mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    single = {}
    with torchdiag.watch(ref, optimizer=opt, config={"warnings": False}) as diag:
        for step in range(2):
            W.loss_of(ref(torch.cat([r0["xs"][step], r1["xs"][step]]))).backward()
            opt.step()
            opt.zero_grad()
            single[step] = diag.step().to_dict()
    for step in range(2):
        rep = r0["reports"][step]
        assert rep == r1["reports"][step]
        assert len(rep["layers"]) == len(single[step]["layers"]) == 5
        for got, want in zip(rep["layers"], single[step]["layers"]):
            assert got["name"] == want["name"]
            for key in ("act_mean", "act_std", "act_absmax", "zero_fraction", "gain", "weight_std", "update_ratio",
                        "forward_ratio", "backward_ratio"):
                if want[key] is None:
                    assert got[key] is None, (got["name"], key)
                else:
                    assert close(got[key], want[key], rel=1e-4), (step, got["name"], key, got[key], want[key])
            # gradients are those of each rank's own loss (its local mean): WORLD x the global mean's
            assert close(got["grad_std"], WORLD * want["grad_std"], rel=1e-4), (got["name"], "grad_std")
        for key in ("grad_norm_preclip", "grad_norm_postclip"):
            assert close(rep[key], single[step][key], rel=1e-4), key
    # and independently of torchdiag: the weight std after the last step
    for layer in r0["reports"][1]["layers"]:
        m = ref.get_submodule(layer["name"])
        if isinstance(m, nn.Linear):
            assert close(layer["weight_std"], m.weight.double().std(unbiased=False).item(), rel=1e-4)


def test_ranks_with_different_step_times_record_the_same_steps_under_the_time_budget(runs):
    """Each recorded step runs a collective: ranks whose clocks give different costs must still record the same
    steps (they agree on the largest interval), or torchdiag would hang or stop reducing. Right answer: the same
    recorded steps and the same reports on both ranks, the first five in full, fewer than all 60, and no warning."""
    r0, r1 = runs["budget"]
    assert r0["recorded"] == r1["recorded"]
    assert r0["recorded"][:5] == [0, 1, 2, 3, 4] and len(r0["recorded"]) < 60
    assert r0["reports"] == r1["reports"]
    last = r0["reports"][r0["recorded"][-1]]
    assert "time budget" in last["cadence"] and last["record_interval"] >= 1
    assert r0["warnings"] == r1["warnings"] == []


# ------------------------------------------------------------------ torchrun example
def test_ddp_example_under_torchrun(tmp_path):
    logdir = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "examples" / "ddp.py"), "--logdir", str(logdir),
           "--steps", "12"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun examples/ddp.py did not finish within {TIMEOUT} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert out.count("torchdiag report") == 1  # rank 0 alone prints
    assert [p.name for p in tmp_path.iterdir()] == ["logs"]  # one logdir, nothing else written
    assert list(logdir.glob("events.out.tfevents.*"))


# ------------------------------------------------------------------ single process: nothing distributed
def test_single_process_never_calls_a_collective(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a collective in a single process")

    monkeypatch.setattr(torch.distributed, "all_reduce", refuse)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torchdiag.watch(model) as diag:
        model(torch.randn(3, 4)).sum().backward()
        assert diag.step() is not None
    assert distributed.resolve(None) is None and distributed.rank_zero() and not distributed.is_dist()


def test_process_group_without_torch_distributed_is_a_clear_error():
    with pytest.raises(torchdiag.TorchDiagError, match="not initialised"):
        torchdiag.watch(nn.Linear(2, 2), process_group=object())


def test_ddp_wrapper_is_unwrapped():
    class FakeDDP(nn.parallel.DistributedDataParallel):  # no process group needed to test the unwrapping
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    inner = nn.Sequential(nn.Linear(2, 2))
    assert distributed.unwrap(FakeDDP(inner)) is inner
    assert distributed.unwrap(inner) is inner


# ------------------------------------------------------------------ the reduction itself, two ranks as threads
class _ThreadGroup:
    """All-reduce between threads: each rank's collective meets the others' at a barrier."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world
        self.result = None

    def all_reduce(self, rank: int, values: list[float], op) -> list[float]:
        self.slots[rank] = values
        if self.barrier.wait() == 0:
            fn = max if op == torch.distributed.ReduceOp.MAX else sum
            self.result = [fn(col) for col in zip(*self.slots)]
        self.barrier.wait()
        out = list(self.result)
        self.barrier.wait()
        return out

    def all_gather(self, rank: int, values: list[float]) -> list[list[float]]:
        self.slots[rank] = values
        self.barrier.wait()
        out = [list(v) for v in self.slots]
        self.barrier.wait()
        return out


SLOTS = [Slot(name="l", module_type="Linear", role="weighted", is_layer=True, weight_name="weight")]


def _reduce_in_threads(per_rank: list[dict]) -> list[Decoded]:
    """Each rank's moments through StepReducer.reduce (its layout check and the step-number check included)."""
    group = _ThreadGroup(len(per_rank))
    reducers = []
    for r in range(len(per_rank)):
        red = distributed.StepReducer(SLOTS, distributed.Group(pg=None, rank=r, world=len(per_rank),
                                                               device=torch.device("cpu")))
        red._all_reduce = lambda v, op, r=r: group.all_reduce(r, v, op)
        red._all_gather = lambda v, r=r: group.all_gather(r, v)
        reducers.append(red)
    out: list = [None] * len(per_rank)

    def run(r):
        local = Decoded(moments=per_rank[r], order={0: 0} if per_rank[r] else {},
                        calls={0: 1} if per_rank[r] else {})
        reduced = reducers[r].reduce(0, local.accumulators(), reduction_layout(SLOTS))
        out[r] = Decoded.from_accumulators(reduced)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(per_rank))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def _accumulated(x: torch.Tensor) -> MomentAccumulator:
    m = MomentAccumulator()
    m.add_row(x.numel(), [v.item() for v in stats.act_row(x)])
    return m


def test_reduction_is_exact_where_plain_power_sums_cancel():
    # |mean| / std = 1e6: sums of squares about zero would lose every digit of the variance in float64
    x0 = 1e4 + 1e-2 * torch.randn(1000, dtype=torch.float64)
    x1 = 1e4 + 3e-2 * torch.randn(3000, dtype=torch.float64) + 0.05
    moms = [{(0, ACT): _accumulated(x - 1e4), (0, GRAD): _accumulated(x)} for x in (x0, x1)]
    for m, x in zip(moms, (x0, x1)):  # rows are float32 on the device; these are exact float64 moments
        m[(0, GRAD)] = MomentAccumulator(n=x.numel(), mean=x.mean().item(), m2=((x - x.mean()) ** 2).sum().item(),
                                         min=x.min().item(), max=x.max().item(), calls=1)
    a, b = _reduce_in_threads(moms)
    assert a.moments and repr(a) == repr(b)
    g = a.moments[(0, GRAD)]
    x = torch.cat([x0, x1])
    assert g.n == 4000 and g.std == pytest.approx(x.std(unbiased=False).item(), rel=1e-9)
    assert g.mean == pytest.approx(x.mean().item(), rel=1e-14)
    assert (g.min, g.max) == (x.min().item(), x.max().item())
    # a constant tensor on both ranks: exactly zero variance
    c = torch.full((10,), 3.25)
    a, _ = _reduce_in_threads([{(0, ACT): _accumulated(c)}, {(0, ACT): _accumulated(c)}])
    assert a.moments[(0, ACT)].m2 == 0.0 and a.moments[(0, ACT)].mean == 3.25


def test_reduction_of_nan_and_of_an_empty_rank():
    bad = torch.tensor([1.0, float("nan"), 2.0])
    good = torch.tensor([-4.0, 5.0])
    a, b = _reduce_in_threads([{(0, ACT): _accumulated(bad)}, {(0, ACT): _accumulated(good)}])
    m = a.moments[(0, ACT)]
    assert m.nonfinite == 1 and math.isnan(m.min) and math.isnan(m.max) and m.n == 5
    # one rank recorded nothing this step: the other's numbers, the layer present, nothing hangs
    a, b = _reduce_in_threads([{(0, ACT): _accumulated(good)}, {}])
    assert repr(a) == repr(b)
    m = a.moments[(0, ACT)]
    assert (m.n, m.mean, m.min, m.max) == (2, 0.5, -4.0, 5.0) and a.order == {0: 0}
    # nobody recorded anything: no layer
    a, _ = _reduce_in_threads([{}, {}])
    assert a.order == {} and a.moments == {}
