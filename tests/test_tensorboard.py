"""TensorBoard panels and `torchdiag summarize`, read back with TensorBoard's own reader and server."""

import atexit
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import torchdiag
from torchdiag import cli
from torchdiag.config import Config
from torchdiag.sinks import tensorboard as tbsink
from torchdiag.stats import HIST_BINS

ALL = {ea.SCALARS: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 0}


def load(path):
    acc = ea.EventAccumulator(str(path), size_guidance=ALL)
    acc.Reload()
    return acc


def texts(acc, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag + tbsink.TEXT_SUFFIX)]


class Capture:
    """Independent copies of a module's output and of the gradient at that output, per forward."""

    def __init__(self, module):
        self.acts, self.grads = [], []
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if torch.is_grad_enabled():
            self.acts.append(out.detach().clone())
            out.register_hook(lambda g: self.grads.append(g.detach().clone()))


def train(model, steps, *, x=None, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, **kw) as diag:
            for i in range(steps):
                inp = x[i] if x is not None else torch.randn(16, model[0].in_features)
                model(inp).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                reports.append(diag.step())
    return diag, reports


def mlp():
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


# ----------------------------------------------------------------- scalars and histograms
def test_scalars_and_histograms_match_the_tensors(tmp_path):
    model = mlp()
    cap0, cap1 = Capture(model[0]), Capture(model[1])
    _, reports = train(model, 5, logdir=tmp_path, config={"histogram_every": 2})
    acc = load(tmp_path)

    for metric in ("act_mean", "act_std", "grad_std", "grad_norm", "weight_std", "gain"):
        assert [e.step for e in acc.Scalars(f"{metric}/0")] == [0, 1, 2, 3, 4], metric
    assert [e.step for e in acc.Scalars("zero_frac/1")] == [0, 1, 2, 3, 4]  # zeros are counted on ReLU outputs
    assert "zero_frac/0" not in acc.Tags()["scalars"]
    act_std = [e.value for e in acc.Scalars("act_std/0")]
    grad_std = [e.value for e in acc.Scalars("grad_std/1")]
    zero = [e.value for e in acc.Scalars("zero_frac/1")]
    for i in range(5):
        assert act_std[i] == pytest.approx(cap0.acts[i].double().std(correction=0).item(), rel=1e-5)
        assert grad_std[i] == pytest.approx(cap1.grads[i].double().std(correction=0).item(), rel=1e-5)
        assert zero[i] == pytest.approx((cap1.acts[i] == 0).double().mean().item(), abs=1e-6)

    for tag, caps in (("act/0", cap0.acts), ("grad/0", cap0.grads), ("act/1", cap1.acts), ("grad/1", cap1.grads)):
        events = acc.Histograms(tag)
        assert [e.step for e in events] == [0, 2, 4], tag
        for e in events:
            t = caps[e.step]
            h = e.histogram_value
            lo, hi = t.min().item(), t.max().item()
            ref = torch.histc(t, bins=HIST_BINS, min=lo, max=hi)
            assert list(h.bucket)[1:] == ref.tolist(), (tag, e.step)  # exactly histc's counts
            assert h.bucket[0] == 0 and len(h.bucket) == len(h.bucket_limit) == HIST_BINS + 1
            assert h.bucket_limit[0] == pytest.approx(lo, abs=1e-6) and h.bucket_limit[-1] == pytest.approx(hi)
            assert (h.min, h.max, h.num) == (pytest.approx(lo), pytest.approx(hi), t.numel())
            assert h.sum == pytest.approx(t.double().sum().item(), rel=1e-4, abs=1e-6)
            assert h.sum_squares == pytest.approx(t.double().pow(2).sum().item(), rel=1e-5)


def test_histogram_windows_off_and_constant_tensor(tmp_path):
    model = mlp()
    train(model, 16, logdir=tmp_path / "a", every=3, config={"histogram_every": 5})
    # recorded steps 0,3,...,15; the first recorded step of each 5-step window gets histograms
    assert [e.step for e in load(tmp_path / "a").Histograms("act/0")] == [0, 6, 12, 15]
    train(mlp(), 3, logdir=tmp_path / "b", config={"histogram_every": 0})
    acc = load(tmp_path / "b")
    assert acc.Tags()["histograms"] == [] and "act_std/0" in acc.Tags()["scalars"]

    # a constant output (zero weights and bias) is binned like histc: range [c - 1, c + 1], middle bin
    model = mlp()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(0.5)
    train(model, 1, logdir=tmp_path / "c")
    h = load(tmp_path / "c").Histograms("act/0")[0].histogram_value
    ref = torch.histc(torch.full((16 * 24,), 0.5), bins=HIST_BINS, min=-0.5, max=1.5)
    assert list(h.bucket)[1:] == ref.tolist() and (h.min, h.max) == (0.5, 0.5)


def test_shared_module_histogram_merges_every_call(tmp_path):
    shared = nn.Linear(8, 8)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = shared

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)) * 3)

    model = Twice()
    cap = Capture(shared)
    with torchdiag.watch(model, logdir=tmp_path) as diag:
        model(torch.randn(32, 8)).sum().backward()
        diag.step()
    h = load(tmp_path).Histograms("act/lin")[0].histogram_value
    both = torch.cat([a.reshape(-1) for a in cap.acts])
    assert h.num == both.numel() == sum(h.bucket)
    assert (h.min, h.max) == (pytest.approx(both.min().item()), pytest.approx(both.max().item()))
    # re-binned onto the union range: each count moved by less than one bin
    centres = [(a + b) / 2 for a, b in zip(h.bucket_limit[:-1], h.bucket_limit[1:])]
    width = h.bucket_limit[2] - h.bucket_limit[1]
    mean = sum(c * n for c, n in zip(centres, h.bucket[1:])) / h.num
    assert abs(mean - both.mean().item()) < width


def test_nonfinite_layer_gets_a_flag_not_a_histogram(tmp_path):
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, logdir=tmp_path) as diag:
            model(torch.randn(8, 12)).sum().backward()
            diag.step()
    acc = load(tmp_path)
    hist_tags = acc.Tags()["histograms"]
    assert {"act/0", "act/1"} <= set(hist_tags) and "act/2" not in hist_tags
    assert [e.value for e in acc.Scalars("flag/nonfinite/2")] == [1.0]
    assert not any(t.startswith("flag/nonfinite/") and not t.endswith("/2") for t in acc.Tags()["scalars"])


# ----------------------------------------------------------------- flags, text, layout, profile
def test_flags_appear_and_recover_and_summarize_says_when(tmp_path, capsys):
    model = mlp()
    with warnings.catch_warnings(), torchdiag.watch(model, logdir=tmp_path / "run") as diag:
        warnings.simplefilter("ignore")
        for i in range(4):
            with torch.no_grad():
                model[0].bias.fill_(-100.0 if i in (1, 2) else 0.0)  # ReLU '1' dead at steps 1 and 2
            model(torch.randn(16, 12)).sum().backward()
            diag.step()
    acc = load(tmp_path / "run")
    flags = [t for t in acc.Tags()["scalars"] if t.startswith("flag/")]
    assert flags == ["flag/dead/1"]  # healthy layers add no tags
    assert [(e.step, e.value) for e in acc.Scalars("flag/dead/1")] == [(1, 1.0), (2, 1.0), (3, 0.0)]
    assert [e.value for e in acc.Scalars(tbsink.FLAGGED_TAG)] == [0.0, 1.0, 1.0, 0.0]
    warned = texts(acc, tbsink.WARNINGS_TAG)
    assert [s for s, _ in warned] == [1] and "'1' (ReLU) is dead" in warned[0][1]

    assert cli.main(["summarize", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 3" in out and "OK: nothing flagged at step 3" in out
    assert re.search(r"dead\s+step 1: '1' \(since recovered\)", out)
    assert cli.main(["summarize", str(tmp_path), "--step", "2"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^ *1 +1 +ReLU .* dead", out, re.M) and "FAIL: dead flagged at step 2" in out
    assert "'1' (ReLU) is dead" in out  # the warning text, read back
    assert cli.main(["summarize", str(tmp_path), "--step", "2", "--fail-on", "vanishing,nonfinite"]) == 0
    assert "not in --fail-on" in capsys.readouterr().out


def test_report_text_layers_text_and_depth_profile(tmp_path):
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    diag, reports = train(model, 4, logdir=tmp_path, config={"profile_every": 2})
    acc = load(tmp_path)
    (step, layers), = texts(acc, tbsink.LAYERS_TAG)
    assert step == 0 and "| 3 | 3 | Tanh |" in layers
    report_texts = dict(texts(acc, tbsink.REPORT_TAG))
    assert sorted(report_texts) == [0, 2, 3]  # profile snapshots and the last step
    assert report_texts[3] == "```\n" + str(diag.report()) + "\n```"

    runs = sorted(os.listdir(tmp_path / tbsink.PROFILE_DIR))
    assert runs == ["step_00000000", "step_00000002", "step_00000003"]
    for name in runs:
        step = int(name.split("_")[1])
        prof = load(tmp_path / tbsink.PROFILE_DIR / name)
        rep = reports[step]
        for key in ("act_std", "grad_std"):
            pts = acc_values(prof, f"{tbsink.PROFILE_DIR}/{key}")
            assert [s for s, _ in pts] == [layer.index for layer in rep.layers]  # x axis = layer index
            assert [v for _, v in pts] == pytest.approx([getattr(layer, key) for layer in rep.layers], rel=1e-6)
    # the depth-profile runs are not mixed into the main run
    assert not any(t.startswith(tbsink.PROFILE_DIR) for t in acc.Tags()["scalars"])


def acc_values(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(Block(), Block())
        self.enc = nn.Linear(8, 8)  # a name that prefixes "encoder" must not join its chart
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.enc(self.encoder(x)))


def test_user_writer_layout_once_and_subruns_under_its_logdir(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    model = Net()
    for _ in range(2):  # two watches on one writer: one layout
        with torchdiag.watch(model, writer=writer) as diag:
            model(torch.randn(4, 8)).sum().backward()
            diag.step()
    writer.add_scalar("mine", 1.0, 0)  # still open
    writer.close()
    acc = load(tmp_path)
    configs = acc.Tensors("custom_scalars__config__")
    assert len(configs) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(configs[0].tensor_proto.string_val[0])
    charts = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    tags = acc.Tags()["scalars"]
    metric_cat = next(v for k, v in charts.items() if "per metric" in k)
    assert set(metric_cat) == set(tbsink.SCALARS.values())
    matched = {t for t in tags if any(re.match(r, t) for r in metric_cat["act_std"])}
    assert matched == {t for t in tags if t.startswith("act_std/")} and len(matched) == 6
    block_cat = next(v for k, v in charts.items() if "blocks" in k)
    enc = next(v for k, v in block_cat.items() if k.startswith("block encoder:"))
    assert {t for t in tags if any(re.match(r, t) for r in enc)} == {
        f"{m}/encoder.{i}.{p}" for m in ("act_std", "grad_std") for i in (0, 1) for p in ("fc", "act")}
    assert sorted(k.split(":")[0] for k in block_cat) == ["block enc", "block encoder", "block head"]
    assert os.listdir(tmp_path / tbsink.PROFILE_DIR) == ["step_00000000"]


def test_duck_typed_writer_gets_scalars_only():
    class Minimal:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

    w = Minimal()
    model = mlp()
    with torchdiag.watch(model, writer=w) as diag:
        model(torch.randn(4, 12)).sum().backward()
        rep = diag.step()
    got = {t: v for t, v, s in w.scalars if s == 0}
    assert got["act_std/0"] == pytest.approx(rep["0"].act_std) and got[tbsink.FLAGGED_TAG] == 0


# ----------------------------------------------------------------- flushing
def test_owned_writer_flushed_when_the_loop_raises(tmp_path):
    model = mlp()
    with pytest.raises(RuntimeError, match="boom"):
        with torchdiag.watch(model, logdir=tmp_path) as diag:
            for i in range(3):
                model(torch.randn(4, 12)).sum().backward()
                if i == 2:
                    raise RuntimeError("boom")
                diag.step()
    acc = load(tmp_path)
    assert [e.step for e in acc.Scalars("act_std/0")] == [0, 1, 2]  # the interrupted step too
    assert [s for s, _ in texts(acc, tbsink.REPORT_TAG)] == [0, 2]


def test_atexit_flushes_an_open_watch_and_close_unregisters(tmp_path, monkeypatch):
    # the last step's events are still queued when the process ends (20 layers x 2 histograms): without
    # the atexit flush they are lost, since the writer's thread is a daemon
    script = f"""
import warnings, torch, torchdiag
from torch import nn
warnings.simplefilter("ignore")
model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(20)])
diag = torchdiag.watch(model, logdir={str(tmp_path)!r}, config={{"histogram_every": 1}}).__enter__()  # never left
for _ in range(3):
    model(torch.randn(8, 4)).sum().backward()
    diag.step()
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    acc = load(tmp_path)
    assert [e.step for e in acc.Scalars("act_std/0")] == [0, 1, 2]
    assert [e.step for e in acc.Histograms("grad/19")] == [0, 1, 2]

    registered = []
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: registered.append(f) or f)
    monkeypatch.setattr(atexit, "unregister", lambda f: registered.remove(f))  # ValueError if never registered
    with torchdiag.watch(mlp(), logdir=tmp_path / "b"):
        assert len(registered) == 1
    assert registered == []
    writer = SummaryWriter(str(tmp_path / "c"))
    with pytest.raises(RuntimeError), torchdiag.watch(mlp(), writer=writer):
        assert len(registered) == 1
        raise RuntimeError
    assert registered == []
    writer.close()


# ----------------------------------------------------------------- summarize
def test_summarize_table_matches_the_report_and_exit_codes(tmp_path, capsys):
    torch.manual_seed(0)
    layers = []
    for _ in range(10):
        lin = nn.Linear(32, 32)
        nn.init.xavier_normal_(lin.weight, gain=0.5)  # vanishing forward
        layers += [lin, nn.ReLU()]
    bad = nn.Sequential(*layers, nn.Linear(32, 2))
    _, bad_reports = train(bad, 3, logdir=tmp_path / "runs" / "bad")
    assert bad_reports[-1].flagged
    _, good_reports = train(mlp(), 2, logdir=tmp_path / "runs" / "good")

    assert cli.main(["summarize", str(tmp_path / "runs" / "bad")]) == 1
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\s+\S+\s+(Linear|ReLU)", line)]
    rows = {cells[1]: cells for cells in table}
    rep = bad_reports[-1]
    assert set(rows) == {layer.name for layer in rep.layers}
    for layer in rep.layers:
        cells = rows[layer.name]
        assert float(cells[4]) == pytest.approx(layer.act_std, rel=5e-3)
        assert cells[7] == (",".join(sorted(layer.status)) or "ok")
    problems = sorted({p for layer in rep.flagged for p in layer.status})
    assert f"FAIL: {', '.join(problems)} flagged at step 2" in out

    assert cli.main(["summarize", str(tmp_path / "runs" / "good")]) == 0
    capsys.readouterr()
    # a folder of runs: each summarised, depth-profile sub-runs are not runs
    assert cli.main(["summarize", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr().out
    assert out.count("\nrun ") + out.startswith("run ") == 2 and "depth_profile" not in out
    assert cli.main(["summarize", str(tmp_path / "runs"), "--fail-on", "dead,saturated"]) == 0
    capsys.readouterr()


def test_summarize_errors_exit_2(tmp_path, capsys):
    assert cli.main(["summarize", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["summarize", str(tmp_path / "empty")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    w = SummaryWriter(str(tmp_path / "other"))
    w.add_scalar("loss", 1.0, 0)
    w.close()
    assert cli.main(["summarize", str(tmp_path / "other")]) == 2
    assert "none written by torchdiag" in capsys.readouterr().err
    train(mlp(), 2, logdir=tmp_path / "run")
    assert cli.main(["summarize", str(tmp_path / "run"), "--step", "7"]) == 2
    assert "step 7 was not recorded" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["summarize", str(tmp_path / "run"), "--fail-on", "vanishing,bogus"])
    assert e.value.code == 2
    # the console command itself, exit status included
    proc = subprocess.run([sys.executable, "-m", "torchdiag", "summarize", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no TensorBoard event files" in proc.stderr


def test_config_keys_validated():
    assert Config.defaults().histogram_every > 0 and Config.defaults().profile_every > 0
    assert Config.from_dict({"histogram_every": 0, "profile_every": 0}).histogram_every == 0
    for key in ("histogram_every", "profile_every"):
        with pytest.raises(torchdiag.ConfigError, match=rf"'{key}' expects an integer >= 0, got -1"):
            Config.from_dict({key: -1})
        with pytest.raises(torchdiag.ConfigError, match=rf"'{key}' expects an integer"):
            Config.from_dict({key: 1.5})


# ----------------------------------------------------------------- the real TensorBoard server
def _free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_server_serves_scalars_histograms_and_layout(tmp_path):
    model = mlp()
    cap = Capture(model[0])
    _, reports = train(model, 3, logdir=tmp_path / "exp", config={"histogram_every": 2})
    port = _free_port()
    log = open(tmp_path / "tensorboard.log", "wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host",
                             "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        runs = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()[-2000:]
            try:
                runs = _get(port, "/data/runs")
                if "exp" in runs and any("depth_profile" in r for r in runs):
                    tags = _get(port, "/data/plugin/scalars/tags").get("exp", {})
                    if "act_std/0" in tags:
                        break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"TensorBoard did not serve the run within 60 s (runs: {runs})")
        assert "exp/depth_profile/step_00000000" in runs and "exp/depth_profile/step_00000002" in runs

        scalars = _get(port, "/data/plugin/scalars/scalars", tag="act_std/0", run="exp")
        assert [s for _, s, _ in scalars] == [0, 1, 2]
        assert [v for _, _, v in scalars] == pytest.approx([r["0"].act_std for r in reports], rel=1e-6)

        hists = _get(port, "/data/plugin/histograms/histograms", tag="act/0", run="exp")
        assert [s for _, s, _ in hists] == [0, 2]
        for _, step, buckets in hists:
            t = cap.acts[step]
            assert sum(c for _, _, c in buckets) == t.numel()
            assert buckets[0][0] == pytest.approx(t.min().item())
            assert buckets[-1][1] == pytest.approx(t.max().item())
            ref = torch.histc(t, bins=HIST_BINS, min=t.min().item(), max=t.max().item())
            nonempty = [c for _, _, c in buckets if c]
            assert nonempty == [c for c in ref.tolist() if c]

        layout = _get(port, "/data/plugin/custom_scalars/layout")
        titles = {c["title"]: [ch["title"] for ch in c["chart"]] for c in layout["category"]}
        per_metric = next(v for k, v in titles.items() if "per metric" in k)
        assert {"act_std", "grad_std", "zero_frac"} <= set(per_metric)
        assert any("depth profile" in k for k in titles)

        profile = _get(port, "/data/plugin/scalars/scalars", tag="depth_profile/grad_std",
                       run="exp/depth_profile/step_00000002")
        assert [s for _, s, _ in profile] == [layer.index for layer in reports[2].layers]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ----------------------------------------------------------------- CUDA: no host sync in the hook path
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_histogram_steps_do_not_sync_on_cuda(tmp_path):
    model = mlp().cuda()
    cap = Capture(model[0])
    x = torch.randn(64, 12, device="cuda")
    with torchdiag.watch(model, logdir=tmp_path, config={"histogram_every": 2}) as diag:
        for _ in range(3):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(x).pow(2).mean().backward()  # every hook, histograms included, runs here
            finally:
                torch.cuda.set_sync_debug_mode("default")
            diag.step()
    acc = load(tmp_path)
    for e in acc.Histograms("act/0"):
        t = cap.acts[e.step]
        ref = torch.histc(t, bins=HIST_BINS, min=t.min().item(), max=t.max().item())
        assert list(e.histogram_value.bucket)[1:] == ref.cpu().tolist()
    assert [e.step for e in acc.Histograms("act/0")] == [0, 2]
    assert not math.isnan(acc.Scalars("act_std/0")[-1].value)


def test_compiled_crc_writes_events_tensorboard_reads_back(tmp_path):
    pytest.importorskip("google_crc32c")
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as pure
    from tensorboard.summary.writer import record_writer

    from torchdiag.sinks.tensorboard import use_compiled_crc

    assert use_compiled_crc()
    for data in (b"", b"torchdiag", bytes(range(256)) * 40):
        assert record_writer.masked_crc32c(data) == pure(data)
    model = mlp()
    train(model, 2, logdir=tmp_path)
    assert [e.step for e in load(tmp_path).Scalars("act_std/0")] == [0, 1]  # the reader checks every CRC
