"""`torchdiag check MODULE:FACTORY`, and console output that fits a terminal (width, colour)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch
from torch import nn

import torchdiag
from torchdiag._report.report import render, use_color
from torchdiag.cli._main import main

ESC = "\033["

MODELS = '''
import torch
from torch import nn

WIDTH = 32


def _mlp(std=None, depth=6):
    layers = []
    for _ in range(depth):
        lin = nn.Linear(WIDTH, WIDTH)
        if std is None:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        else:
            nn.init.normal_(lin.weight, std=std)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 4))


def healthy():
    return _mlp()


def vanishing():
    return _mlp(std=0.01)


class Lm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 50, (ids.dtype, ids.max())
        return self.head(self.emb(ids))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def embedding_lm():
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))


def broken():
    raise ValueError("cannot build this one")


def not_a_module():
    return 42


INSTANCE = nn.Linear(WIDTH, 2)
NUMBER = 7
'''


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A uniquely named module of factories in a fresh cwd; returns its importable name."""
    name = f"tdcheck_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delenv("NO_COLOR", raising=False)
    yield name
    sys.modules.pop(name, None)


def run(capsys, *argv):
    status = main(["check", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def seeded_report(factory, shape, seed=0):
    """What the command documents: the factory called after manual_seed(seed), a standard normal input from a
    generator seeded with the same seed, torchdiag.check."""
    torch.manual_seed(seed)
    model = factory()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return torchdiag.check(model, x)


def assert_same_report(expected, out, model=None, shape=None):
    """``out`` holds ``expected``'s figures row by row (the check table), and everything ``str(expected)`` says
    below its table (findings, notes), line for line."""
    lines = out.splitlines()
    n = len(expected.layers)
    for layer in expected.layers:
        row = next(line for line in lines if line.split()[:1] == [str(layer.index)] and len(line.split()) > 6)
        cells = row.split()
        assert cells[1] == layer.name or "…" in cells[1]
        for x in (layer.act_std, layer.grad_std):
            assert f"{x:.3g}" in cells
        assert (",".join(sorted(layer.status)) or "ok") in cells
    below = str(expected).splitlines()[2 + n:]
    text = "\n".join(lines)
    assert "\n".join(below) in text


def output_shapes(model, *inputs):
    """Independent: every module's output shape from forward hooks of the test's own."""
    shapes, handles = {}, []

    def hook(name):
        def record(module, args, out):
            shapes.setdefault(name, tuple(out.shape))
        return record

    for name, m in model.named_modules():
        handles.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return shapes


# ------------------------------------------------------------------ exit 0 / 1
def test_healthy_model_exits_0_and_prints_the_same_report_as_check(models, capsys):
    status, out, err = run(capsys, f"{models}:healthy", "--input-shape", "16,32")
    assert status == 0, out + err
    module = sys.modules[models]
    expected = seeded_report(module.healthy, (16, 32))
    assert expected.flagged == []
    assert_same_report(expected, out)  # same model, same input: the same figures
    assert "no problems found" in out and "Sequential" in out and "(16,32) float32" in out
    assert out.splitlines()[-1] == "OK: nothing flagged"  # a verdict line, as summarize's "OK: nothing found ..."
    assert ESC not in out  # captured stdout is not a terminal


def test_flagged_model_exits_1_and_fail_on_restricts_it(models, capsys):
    status, out, _ = run(capsys, f"{models}:vanishing", "--input-shape", "16,32")
    assert status == 1
    expected = seeded_report(sys.modules[models].vanishing, (16, 32))
    assert {p for layer in expected.flagged for p in layer.status} == {"vanishing"}
    assert_same_report(expected, out)
    assert "FAIL: vanishing" in out
    status, out, _ = run(capsys, f"{models}:vanishing", "--input-shape", "16,32", "--fail-on", "nonfinite,dead")
    assert status == 0 and "OK: vanishing flagged, not in --fail-on (nonfinite, dead)" in out


def test_config_file_is_used(models, capsys, tmp_path):
    cfg = tmp_path / "loose.yaml"
    cfg.write_text("vanishing_ratio: 1.0e-12\n")
    assert run(capsys, f"{models}:vanishing", "--input-shape", "16,32")[0] == 1
    status, out, _ = run(capsys, f"{models}:vanishing", "--input-shape", "16,32", "--config", str(cfg))
    assert status == 0 and "no problems found" in out
    (tmp_path / "bad.yaml").write_text("vanishing_ratoi: 0.5\n")
    status, _, err = run(capsys, f"{models}:healthy", "--input-shape", "16,32", "--config", str(tmp_path / "bad.yaml"))
    assert status == 2 and "vanishing_ratoi" in err


def test_seed_changes_the_input_and_the_model(models, capsys):
    module_name = models
    _, out0, _ = run(capsys, f"{module_name}:healthy", "--input-shape", "16,32")
    _, out1, _ = run(capsys, f"{module_name}:healthy", "--input-shape", "16,32", "--seed", "1")
    assert_same_report(seeded_report(sys.modules[module_name].healthy, (16, 32), seed=1), out1)
    assert out0 != out1


def test_a_path_to_a_py_file_that_imports_its_neighbour(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "src"
    pkg.mkdir()
    helper = f"tdcheck_helper_{uuid.uuid4().hex[:8]}"
    (pkg / f"{helper}.py").write_text("from torch import nn\nSIZE = 12\n")
    (pkg / "factories.py").write_text(textwrap.dedent(f"""
        from torch import nn
        from {helper} import SIZE

        def make():
            return nn.Sequential(nn.Linear(SIZE, SIZE), nn.Tanh(), nn.Linear(SIZE, 1))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    status, out, err = run(capsys, "src/factories.py:make", "--input-shape", "4,12")
    assert status == 0, err
    assert "Sequential (169 parameters), input (4,12) float32" in out
    sys.modules.pop(helper, None)


def test_integer_inputs_and_several_inputs(models, capsys):
    status, out, err = run(capsys, f"{models}:Lm", "--input-shape", "4,10", "--dtype", "int64", "--int-high", "50")
    assert status in (0, 1), err  # the model asserts dtype and range itself
    assert "input (4,10) int64" in out and "emb" in out and "head" in out
    status, out, err = run(capsys, f"{models}:TwoInputs", "--input-shape", "5,8", "--input-shape", "5,3")
    assert status == 0, err
    assert "input (5,8) float32, (5,3) float32" in out
    status, out, err = run(capsys, f"{models}:INSTANCE", "--input-shape", "2,32", "--dtype", "float64")
    assert status == 2 and "Linear on input (2,32) float64" in err  # a float32 model on a float64 input
    assert "(the model's parameters are float32)" in err


# ------------------------------------------------------------------ exit 2
@pytest.mark.parametrize("target, shape, extra, message", [
    ("{m}_missing:healthy", "4,32", [], "cannot import '{m}_missing': ModuleNotFoundError"),
    ("{m}:nope", "4,32", [], "has no attribute 'nope'; it has: INSTANCE, Lm, NUMBER"),
    ("{m}:broken", "4,32", [], "broken() raised ValueError: cannot build this one"),
    ("{m}:not_a_module", "4,32", [], "returned an object of type int, not a torch.nn.Module"),
    ("{m}:NUMBER", "4,32", [], "is not callable (it is of type int)"),
    ("{m}:healthy", "4,31", [], "Sequential on input (4,31) float32: check(): the model raised RuntimeError"),
    ("{m}:Lm", "4,10", ["--dtype", "int64"], "needs --int-high N"),
    ("{m}:TwoInputs", "5,8", ["--input-shape", "5,3", "--dtype", "float32", "--dtype", "float32", "--dtype",
                              "int64"], "give --dtype once, or once per --input-shape (2); got 3"),
    ("{m}", "4,32", [], "expected MODULE:FACTORY"),
    ("does/not/exist.py:make", "4,32", [], "no such file"),
])
def test_unusable_targets_exit_2_with_a_clear_message(models, capsys, target, shape, extra, message):
    status, out, err = run(capsys, target.format(m=models), "--input-shape", shape, *extra)
    assert status == 2
    assert message.format(m=models) in err
    assert out == ""


def test_an_import_that_raises_exits_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "raises.py").write_text("raise RuntimeError('import-time failure')\n")
    (tmp_path / "syntax.py").write_text("def broken(:\n")
    monkeypatch.chdir(tmp_path)
    status, _, err = run(capsys, "raises.py:make", "--input-shape", "2,2")
    assert status == 2 and "RuntimeError: import-time failure" in err
    status, _, err = run(capsys, "./syntax.py:make", "--input-shape", "2,2")
    assert status == 2 and "SyntaxError" in err


@pytest.mark.parametrize("argv", [
    ["--input-shape", "4,a"], ["--input-shape", "4,0"], ["--input-shape", ""], ["--dtype", "float33"], [],
])
def test_bad_arguments_are_usage_errors(models, capsys, argv):
    if "--input-shape" not in argv:
        argv = argv + (["--input-shape", "4,32"] if argv else [])
    with pytest.raises(SystemExit) as e:
        main(["check", f"{models}:healthy", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: torchdiag check" in err


def test_the_installed_command(tmp_path):
    (tmp_path / "m.py").write_text("from torch import nn\ndef f():\n    return nn.Sequential(nn.Linear(3, 3))\n")
    done = subprocess.run([sys.executable, "-m", "torchdiag", "check", "m:f", "--input-shape", "2,3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torchdiag report" in done.stdout and ESC not in done.stdout


# ------------------------------------------------------------------ colour
class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_use_color_only_on_a_tty_without_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(FakeTTY()) is True
    assert use_color(io.StringIO()) is False
    assert use_color(object()) is False
    monkeypatch.setenv("NO_COLOR", "")  # any value, even empty, turns colour off (no-color.org)
    assert use_color(FakeTTY()) is False


def _check_args(models, *extra):
    import argparse

    from torchdiag.cli._check_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([f"{models}:vanishing", "--input-shape", "16,32", *extra])


def test_check_colours_flagged_rows_on_a_tty_only(models, monkeypatch):
    from torchdiag.cli._check_cli import run_check

    tty = FakeTTY()
    assert run_check(_check_args(models), out=tty, err=io.StringIO()) == 1
    coloured = tty.getvalue()
    assert "\033[1;31m" in coloured
    plain = io.StringIO()
    run_check(_check_args(models), out=plain, err=io.StringIO())
    assert ESC not in plain.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    tty = FakeTTY()
    run_check(_check_args(models), out=tty, err=io.StringIO())
    assert ESC not in tty.getvalue()
    # the escapes only wrap lines: without them the text is the same
    assert coloured.replace("\033[1;31m", "").replace("\033[32m", "").replace("\033[0m", "") == plain.getvalue()


def test_summarize_colours_on_a_tty_only(tmp_path, monkeypatch):
    from torchdiag.cli._summarize import summarize

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.ReLU())])
    for p in model.parameters():
        nn.init.normal_(p, std=0.01)
    with pytest.warns(torchdiag.DiagnosticWarning), torchdiag.watch(model, logdir=str(tmp_path)) as diag:
        model(torch.randn(8, 16)).sum().backward()
        diag.step()
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty, plain = FakeTTY(), io.StringIO()
    assert summarize(str(tmp_path), out=tty) == 1 and summarize(str(tmp_path), out=plain) == 1
    assert "\033[1;31m" in tty.getvalue() and ESC not in plain.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    tty = FakeTTY()
    summarize(str(tmp_path), out=tty)
    assert ESC not in tty.getvalue()


# ------------------------------------------------------------------ width
class Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.projection_with_a_long_name = nn.Linear(8, 8)
        self.activation_function_with_long_name = nn.Tanh()

    def forward(self, x):
        return self.activation_function_with_long_name(self.projection_with_a_long_name(x))


class VeryDeeplyNamedActivationFunctionForTesting(nn.ReLU):
    pass


def nested(depth: int = 6) -> nn.Module:
    """ModuleDicts inside ModuleDicts: qualified names of 150+ characters."""
    inner: nn.Module = nn.ModuleDict({"leaf_block_number_one": Leaf(),
                                      "odd_activation": VeryDeeplyNamedActivationFunctionForTesting()})
    for i in range(depth):
        inner = nn.ModuleDict({f"stage_{i}_with_a_rather_long_descriptive_name": inner})

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = inner

        def forward(self, x):
            d = self.body
            while "leaf_block_number_one" not in d:
                d = next(iter(d.values()))
            return d["odd_activation"](d["leaf_block_number_one"](x))

    return Wrapper()


@pytest.mark.parametrize("width", [100, 80])
def test_long_qualified_names_fit_the_width_and_keep_both_ends(width):
    model = nested()
    for p in model.parameters():  # exploding weights: findings with long names below the table too
        nn.init.normal_(p, std=3.0)
    report = torchdiag.check(model, torch.randn(4, 8))
    names = [layer.name for layer in report.layers]
    assert max(len(n) for n in names) > 150
    for color in (False, True):
        text = render(report, color=color, width=width)
        for line in text.splitlines():
            visible = line.replace("\033[1;31m", "").replace("\033[32m", "").replace("\033[0m", "")
            assert len(visible) <= width, (len(visible), visible)
    text = render(report, width=width).splitlines()
    prefix = names[0].rsplit(".", 2)[0]  # what every name shares is dropped from the rows, named in the title
    assert "layers under 'body." in text[0] and all(n.startswith(prefix) for n in names)
    rows = text[2:2 + len(names)]
    for name, row in zip(names, rows):
        cell = row.split()[1]
        assert not cell.startswith("body"), cell
        assert cell.endswith(name.split(".")[-1][-4:]) and cell[0] == name[len(prefix) + 1], (cell, name)
    types = [row.split()[2] for row in rows]
    assert types[2].startswith("Very")  # a long type name is cut last, at its end, only where nothing else gives way
    assert types[2] == "VeryDeeplyNamedActivationFunctionForTesting" or types[2].endswith("…")


def test_a_short_report_is_unchanged_by_the_width_logic():
    report = torchdiag.check(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(8, 4))
    lines = str(report).splitlines()
    assert lines[1].split() == ["#", "layer", "type", "act", "mean", "act", "std", "grad", "std", "gain", "status",
                                "suggestion"]
    assert lines[2].split()[:3] == ["0", "0", "Linear"] and lines[3].split()[:3] == ["1", "1", "ReLU"]
    assert "…" not in str(report) and ESC not in str(report)


# ------------------------------------------------------------------ ModelSummary-style columns, devices
def test_check_table_shows_parameters_and_output_shapes_within_100_columns(models, capsys):
    status, out, err = run(capsys, f"{models}:vanishing", "--input-shape", "16,32")
    assert status == 1, err
    module = sys.modules[models]
    torch.manual_seed(0)
    model = module.vanishing()
    shapes = output_shapes(model, torch.randn(16, 32))
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("#"))
    assert header.split()[:5] == ["#", "layer", "type", "params", "output"]
    rows = [line.split() for line in lines if re.match(r"^\s*\d+\s+\d+\s+(Linear|ReLU)\s", line)]
    assert len(rows) == 13
    for cells in rows:
        m = model.get_submodule(cells[1])
        n = sum(p.numel() for p in m.parameters())
        assert cells[3] == ("-" if n == 0 else f"{n / 1e3:.1f}K" if n >= 1000 else str(n))  # 32*32+32 = 1.1K
        assert cells[4] == ",".join(map(str, shapes[cells[1]]))
    assert all(len(line) <= 100 for line in lines[1:])  # the first line names the target, as long as it is


def test_check_table_fits_100_columns_with_long_names(tmp_path, monkeypatch, capsys):
    (tmp_path / "longnames.py").write_text(textwrap.dedent("""
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder_blocks_with_a_rather_long_name = nn.ModuleList(
                    [nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(2)])
                self.classification_head_projection = nn.Linear(16, 3)

            def forward(self, x):
                for block in self.encoder_blocks_with_a_rather_long_name:
                    x = block(x)
                return self.classification_head_projection(x)
    """))
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, "longnames.py:Net", "--input-shape", "2,5,16")
    assert status in (0, 1), err
    assert all(len(line) <= 100 for line in out.splitlines()[1:])
    assert re.search(r"Linear\s+51\s+2,5,3\s", out)  # 16*3+3 parameters, output (2, 5, 3)
    # a tuple output: its first tensor's shape; out_proj (used functionally, never a row) counts for the attention
    assert re.search(r"Multihead\S*\s+1\.1K\s+2,5,16…", out)  # 3*16*16 + 48 + 16*16 + 16 = 1088


@pytest.mark.parametrize("device", ["xpu", "cuda", "cuda:7", "nonsense"])
def test_an_unusable_device_exits_2_with_one_line(models, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("a CUDA machine: cuda is usable here")
    if device == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        pytest.skip("an XPU machine")
    status, out, err = run(capsys, f"{models}:healthy", "--input-shape", "4,32", "--device", device)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"torchdiag check: --device {device!r}")
    assert "Traceback" not in err


# ------------------------------------------------------------------ rough edges: one line, exit 2
def test_an_embedding_fed_floats_gets_a_one_line_hint(models, capsys):
    status, out, err = run(capsys, f"{models}:embedding_lm", "--input-shape", "4,32")
    assert status == 2 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1, err
    num_embeddings = sys.modules[models].embedding_lm()[0].num_embeddings  # 50
    assert "Embedding '0'" in err and "--dtype int64 --int-high N" in err and f"--int-high {num_embeddings}" in err
    assert "Expected tensor" not in err  # torch's own words are replaced by the fix


@pytest.mark.parametrize("extra, message", [
    (["--input-shape", "100000000,100000"], "--input-shape 100000000,100000: cannot allocate an input of "
                                           f"{100000000 * 100000:,} elements ({100000000 * 100000 * 4 / 2 ** 30:,.1f}"
                                           " GiB of float32)"),
    (["--input-shape", "4,32", "--device", "meta"], "--device 'meta': tensors on the meta device hold no values"),
])
def test_an_unallocatable_input_and_the_meta_device_exit_2_with_one_line(models, capsys, extra, message):
    status, out, err = run(capsys, f"{models}:healthy", *extra)
    assert status == 2 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("torchdiag check: ") and message in err, err


@pytest.mark.parametrize("seed", [str(2 ** 63), "99999999999999999999", "-1", "x"])
def test_a_seed_torch_cannot_take_is_a_usage_error_naming_it(models, capsys, seed):
    with pytest.raises(SystemExit) as e:
        main(["check", f"{models}:healthy", "--input-shape", "4,32", "--seed", seed])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --seed: expected an integer from 0 to 2**63-1; got {seed!r}" in err
    assert "Traceback" not in err
    assert run(capsys, f"{models}:healthy", "--input-shape", "4,32", "--seed", str(2 ** 63 - 1))[0] == 0


@pytest.mark.parametrize("command", ["summarize", "check"])
def test_help_wraps_the_problem_list_at_word_boundaries(capsys, command):
    from torchdiag._report.report import STATUSES

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    words = set(re.findall(r"[a-z_]+", text))
    assert all(p in words for p in STATUSES), [p for p in STATUSES if p not in words]


_NO_TORCH = """
import sys, time
t0 = time.perf_counter()
from torchdiag.cli._main import main
for argv in ARGVS:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, 2), e.code
print("torch" in sys.modules, any(m.startswith("tensorboard") for m in sys.modules), time.perf_counter() - t0)
"""


@pytest.mark.parametrize("argv", [["--help"], ["check", "--help"], ["summarize", "--help"], ["demo", "--help"],
                                  ["check", "m:f", "--input-shape", "4,a"], ["check", "m:f"], ["nonsense"]])
def test_help_and_usage_errors_do_not_import_torch(argv):
    script = _NO_TORCH.replace("ARGVS", repr([argv]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    torch_imported, tensorboard_imported, seconds = done.stdout.split()[-3:]
    print(f"torchdiag {' '.join(argv)}: {float(seconds) * 1000:.0f} ms")
    assert torch_imported == "False" and tensorboard_imported == "False", (argv, done.stdout[-500:])
    assert float(seconds) < 1.0


def test_the_package_names_are_imported_on_first_use():
    done = subprocess.run([sys.executable, "-c", "import sys, torchdiag; assert 'torch' not in sys.modules;"
                           " import torchdiag.watch; w = torchdiag.watch; assert callable(w) and w.__name__ == 'watch',"
                           " w; assert torchdiag.check.__module__ == 'torchdiag._checks.checking'; print(sorted(set("
                           "torchdiag.__all__) - set(dir(torchdiag))))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------ --precision
def test_precision_prints_each_formats_range_table_and_its_verdict(models, capsys):
    status, out, err = run(capsys, f"{models}:healthy", "--input-shape", "16,32", "--precision", "fp16,bf16,fp8")
    assert status == 0, out + err
    heads = [line for line in out.splitlines() if line.startswith("precision ")]
    assert heads == ["precision float16:", "precision bfloat16:", "precision float8_e4m3fn:", "precision float8_e5m2:"]
    # the figures are check(precision=)'s on the same model and input
    module = sys.modules[models]
    torch.manual_seed(0)
    model = module.healthy()
    x = torch.randn((16, 32), generator=torch.Generator().manual_seed(0))
    expected = torchdiag.check(model, x, precision="float16")
    table = out[out.index("precision float16:"):out.index("precision bfloat16:")].splitlines()
    for layer in expected.layers:
        row = next(line for line in table if line.split()[:1] == [str(layer.index)])
        assert f"{layer.act_headroom:.1f} bits" in row and f"{layer.grad_underflow:.1%}" in row
    assert "float16: fits" in out and "float8_e5m2: fits" in out
    assert out.splitlines()[-1] == "OK: nothing flagged"


def test_precision_flags_an_output_near_float16s_max_and_exits_1(models, capsys, tmp_path):
    (tmp_path / "loud.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn


        class Loud(nn.Module):
            """Kaiming Linear layers fed a signal ~5000x larger than unit scale (raw sensor counts)."""

            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
                nn.init.kaiming_normal_(self.net[0].weight, nonlinearity="relu")

            def forward(self, x):
                return self.net(x * 5000)
    '''))
    status, out, _ = run(capsys, "loud.py:Loud", "--input-shape", "64,32", "--precision", "fp16")
    assert status == 1
    assert "float16: overflow_risk" in out and "FAIL: overflow_risk" in out
    assert "! 'net.0' (Linear) is near float16's overflow" in out
    status, out, _ = run(capsys, "loud.py:Loud", "--input-shape", "64,32", "--precision", "bf16")
    assert status == 0 and "bfloat16: fits" in out


def test_an_unknown_precision_is_a_usage_error(models, capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", f"{models}:healthy", "--input-shape", "4,32", "--precision", "fp16,fp12"])
    assert e.value.code == 2
    assert "expected a comma-separated list of fp16" in capsys.readouterr().err


def test_version_says_whether_the_cpu_kernel_was_built_with_this_install():
    import os
    from pathlib import Path

    from torchdiag._stats import _cpurow

    built = any(Path(_cpurow.__file__).parent.glob("_rows*.so"))  # what the install left next to the loader
    env = {k: v for k, v in os.environ.items() if k != "TORCHDIAG_CPU_KERNEL"}
    done = subprocess.run([sys.executable, "-m", "torchdiag", "--version"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == f"torchdiag {torchdiag.__version__} (torch {torch.__version__})"
    assert (second == "CPU statistics kernel: on (built with this install)") == built, second
    off = subprocess.run([sys.executable, "-m", "torchdiag", "--version"], capture_output=True, text=True,
                         timeout=120, env={**env, "TORCHDIAG_CPU_KERNEL": "0"})
    assert off.stdout.splitlines()[1] == "CPU statistics kernel: " + _cpurow.OFF
