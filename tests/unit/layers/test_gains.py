"""Fans per module kind and gains, checked against torch.nn.init itself and a Monte-Carlo estimate."""

import math

import pytest
import torch
from torch import nn

import torchdiag
from torchdiag._layers import gains
from torchdiag._layers.gains import Nonlinearity

torch_fans = nn.init._calculate_fan_in_and_fan_out


# ----------------------------------------------------------------------------- fans
# module, {parameter name: number of stacked blocks it holds}
SINGLE = [
    nn.Linear(7, 5),
    nn.Conv1d(3, 8, 5),
    nn.Conv2d(3, 8, (3, 5)),
    nn.Conv2d(4, 8, 3, groups=2),
    nn.Conv3d(2, 4, (1, 2, 3)),
    nn.ConvTranspose1d(3, 8, 5),
    nn.ConvTranspose2d(4, 6, 3, groups=2),
    nn.ConvTranspose3d(2, 4, (1, 2, 3)),
    nn.Embedding(11, 4),
    nn.EmbeddingBag(11, 4),
    nn.Bilinear(3, 5, 7),
]


@pytest.mark.parametrize("module", SINGLE, ids=lambda m: repr(m))
def test_single_weight_fans_are_torch_nn_init_fans(module):
    assert gains.layer_fans(module) == {"weight": torch_fans(module.weight)}
    assert gains.fans_reason(module) is None


@pytest.mark.parametrize("module, expected", [
    (nn.Conv2d(3, 8, 5), (3 * 25, 8 * 25)),  # (c_in·k², c_out·k²): n_l and n̂_l of He et al.
    (nn.Conv2d(4, 8, 3, groups=2), (2 * 9, 8 * 9)),  # torch: fan_in per group, fan_out not divided
    (nn.ConvTranspose2d(4, 6, 3, groups=2), (3 * 9, 4 * 9)),  # weight (in, out/groups, k, k) read as a conv weight
    (nn.Embedding(11, 4), (4, 11)),
    (nn.Bilinear(3, 5, 7), (3 * 5, 7 * 5)),  # 3-D weight (out, in1, in2): in2 is read as a receptive field
])
def test_fans_by_hand(module, expected):
    assert gains.layer_fans(module)["weight"] == expected


def test_bilinear_reset_parameters_uses_in1_not_the_torch_fan_in():
    torch.manual_seed(0)
    m = nn.Bilinear(30, 50, 70)
    fan_in, _ = gains.layer_fans(m)["weight"]
    assert fan_in == 30 * 50
    bound = m.weight.abs().max().item()  # U(-1/sqrt(in1), 1/sqrt(in1))
    assert 0.99 / math.sqrt(30) < bound <= 1 / math.sqrt(30)
    # the forward sums in1*in2 products x1_i x2_j: Var(y) = in1·in2·Var(W) for unit inputs, so fan_in is in1·in2
    x1, x2 = torch.randn(4000, 30), torch.randn(4000, 50)
    with torch.no_grad():
        nn.init.zeros_(m.bias)
        y = m(x1, x2)
    assert y.var().item() == pytest.approx(fan_in * m.weight.var().item(), rel=0.05)


def blocks(w: torch.Tensor, n: int) -> list:
    return [torch_fans(b) for b in w.chunk(n, dim=0)]


def test_multihead_attention_fans_are_those_of_one_of_the_three_projections():
    m = nn.MultiheadAttention(16, 4)
    fans = gains.layer_fans(m)
    q, k, v = blocks(m.in_proj_weight, 3)
    assert q == k == v == (16, 16)
    assert fans["in_proj_weight"] == q
    assert torch_fans(m.in_proj_weight) == (16, 48)  # what the whole stacked tensor would say
    assert fans["out_proj.weight"] == torch_fans(m.out_proj.weight) == (16, 16)


def test_multihead_attention_with_kdim_vdim_has_separate_projections():
    m = nn.MultiheadAttention(16, 4, kdim=8, vdim=6)
    fans = gains.layer_fans(m)
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert fans[name] == torch_fans(getattr(m, name))
    assert fans["k_proj_weight"] == (8, 16) and fans["v_proj_weight"] == (6, 16)


@pytest.mark.parametrize("module, gates", [
    (nn.LSTM(10, 20, num_layers=2, bidirectional=True), 4),
    (nn.LSTM(10, 20, proj_size=5), 4),
    (nn.GRU(10, 20, num_layers=2), 3),
    (nn.RNN(10, 20, nonlinearity="relu"), 1),
    (nn.LSTMCell(10, 20), 4),
    (nn.GRUCell(10, 20), 3),
    (nn.RNNCell(10, 20), 1),
], ids=lambda x: repr(x) if isinstance(x, nn.Module) else str(x))
def test_recurrent_fans_are_those_of_one_gate_block(module, gates):
    fans = gains.layer_fans(module)
    weights = {n: p for n, p in module.named_parameters() if n.startswith("weight")}
    assert set(fans) == set(weights)
    for name, w in weights.items():
        n = 1 if name.startswith("weight_hr") else gates
        per_block = blocks(w, n)
        assert len(set(per_block)) == 1, name  # the gate blocks are alike
        assert fans[name] == per_block[0], name
    first = "weight_ih_l0" if "weight_ih_l0" in fans else "weight_ih"
    assert fans[first] == (10, 20)  # (input, hidden)


@pytest.mark.parametrize("module, words", [
    (nn.LayerNorm(8), "normalisation"),
    (nn.ReLU(), "no weight"),
    (nn.LazyLinear(4), "lazy"),
])
def test_no_fans_come_with_a_reason(module, words):
    assert gains.layer_fans(module) is None
    assert words in gains.fans_reason(module)


def test_fans_of_an_unknown_module_are_never_guessed():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 64))  # used as x @ w: (in, out), the opposite of a Linear weight

        def forward(self, x):
            return x @ self.w

    assert gains.layer_fans(Mix()) is None
    reason = gains.fans_reason(Mix())
    assert "Mix" in reason and "never guessed" in reason
    report = torchdiag.check(nn.Sequential(Mix(), nn.ReLU()), torch.randn(8, 16))
    assert report["0"].fan_in is None and report["0"].suggested_scale is None


def test_the_report_uses_per_module_fans():
    model = nn.ModuleDict({"lstm": nn.LSTM(8, 16, batch_first=True)})
    report = torchdiag.check(model["lstm"], torch.randn(2, 5, 8))
    # the main weight is weight_hh_l0 (64, 16): one gate block is (16, 16)
    assert (report.layers[0].fan_in, report.layers[0].fan_out) == (16, 16)


@pytest.mark.parametrize("module", [nn.Linear(64, 32), nn.Conv2d(8, 16, 3), nn.ConvTranspose2d(8, 16, 3),
                                    nn.Conv1d(16, 4, 7, groups=4)], ids=repr)
@pytest.mark.parametrize("nl", ["relu", "tanh", "linear", "sigmoid"])
def test_suggested_init_gives_the_target_std(module, nl):
    # the pasteable kaiming_normal_ call and the target std that suggested_scale aims at agree
    torch.manual_seed(0)
    fan_in, _ = gains.layer_fans(module)["weight"]
    w = torch.empty_like(module.weight)
    nn.init.kaiming_normal_(w, nonlinearity=nl)
    assert f"nonlinearity='{nl}'" in gains.suggested_init(Nonlinearity(nl), fan_in)
    assert w.std().item() == pytest.approx(gains.target_std(fan_in, Nonlinearity(nl)), rel=0.06)


# ----------------------------------------------------------------------------- gains
@pytest.mark.parametrize("name", ["linear", "relu", "tanh", "sigmoid", "selu"])
def test_table_gains_are_calculate_gain(name):
    assert gains.gain(Nonlinearity(name)) == nn.init.calculate_gain(name)


@pytest.mark.parametrize("slope", [0.01, 0.2, 1.0])
def test_leaky_relu_gain_is_calculate_gain(slope):
    assert gains.gain(Nonlinearity("leaky_relu", slope)) == pytest.approx(
        nn.init.calculate_gain("leaky_relu", slope), rel=1e-12)
    assert gains.gain(gains.nonlinearity_of(nn.LeakyReLU(slope))) == pytest.approx(
        math.sqrt(2 / (1 + slope ** 2)), rel=1e-12)


def test_the_measured_gain_of_a_leaky_relu_is_the_closed_form():
    # PReLU at its initial slope 0.25 is measured by quadrature: E[f(z)^2] = (1 + a^2) / 2 exactly
    assert gains.gain(Nonlinearity("prelu")) == pytest.approx(nn.init.calculate_gain("leaky_relu", 0.25), rel=1e-6)


@pytest.mark.parametrize("module, fn", [
    (nn.GELU(), torch.nn.functional.gelu),
    (nn.SiLU(), torch.nn.functional.silu),
    (nn.ELU(), torch.nn.functional.elu),
    (nn.Mish(), torch.nn.functional.mish),
], ids=lambda x: type(x).__name__ if isinstance(x, nn.Module) else "")
def test_measured_gains_match_monte_carlo(module, fn):
    # gain = 1 / sqrt(E[f(z)^2]), z ~ N(0, 1); 2^22 samples: relative standard error ~5e-4
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(1 << 22, generator=g, dtype=torch.float64)
    mc = 1 / math.sqrt(fn(z).pow(2).mean().item())
    measured = gains.gain(gains.nonlinearity_of(module))
    assert measured == pytest.approx(mc, rel=3e-3)
    assert abs(measured / math.sqrt(2) - 1) > 0.03  # not ReLU's table gain



def test_lazy_modules_are_watched_without_error():
    # an uninitialised lazy weight has no shape yet: no fans, and describing the module must not raise
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))
    with torchdiag.watch(model) as diag:
        model(torch.randn(16, 5)).sum().backward()
        report = diag.step()
    assert report["0"].fan_in is None and report["2"].fan_in == 8
    # check() initialises a copy (the model stays lazy, issue #14), so it knows the fans
    lazy = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))
    assert torchdiag.check(lazy, torch.randn(16, 5))["0"].fan_in == 5 and nn.parameter.is_lazy(lazy[0].weight)


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU, nn.ReLU])
def test_a_layer_with_a_zero_fan_gets_no_gain_and_a_note(act):
    # Linear(0, n) before GELU/SiLU: ZeroDivisionError from gain / sqrt(fan_in) inside step()
    model = nn.Sequential(nn.Linear(0, 4), act(), nn.Linear(4, 2))
    with torchdiag.watch(model) as diag:
        model(torch.randn(3, 0)).sum().backward()
        report = diag.step()
    row = report["0"]
    assert row.suggested_scale is None and row.fan_in is None
    assert any("zero fan" in n for n in row.notes), row.notes
    assert report["2"].fan_in == 4
    assert gains.layer_fans(nn.Linear(0, 4)) is None and "fan_in 0" in gains.fans_reason(nn.Linear(0, 4))
