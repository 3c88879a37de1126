"""The diagnosis as a pure function of numbers: no model, no tensors."""

import dataclasses
import math

import pytest

from torchdiag._diagnose.diagnose import LayerStats, StepStats, Summary, diagnose
from torchdiag._layers.gains import Nonlinearity
from torchdiag.config import Config

CFG = Config.defaults()


def mom(rms, zero=None, sat=None, nonfinite=False, mean=0.0):
    std = math.sqrt(max(rms * rms - mean * mean, 0.0))
    return Summary(n=1000, mean=mean, std=std, rms=rms, absmax=3 * rms, nonfinite=nonfinite,
                   zero_fraction=zero, saturated_fraction=sat)


def chain(fwd, bwd, width=64, weight_std=None):
    """Linear/ReLU pairs with the given output and gradient rms per pair."""
    layers, i = [], 0
    for f, b in zip(fwd, bwd):
        layers.append(LayerStats(name=f"lin{i}", module_type="Linear", index=2 * i, calls=1, role="weighted",
                                 act=mom(f), grad=mom(b), weight_shape=(width, width),
                                 weight_std=weight_std or 1 / math.sqrt(width), weight_rms=1.0,
                                 fan_in=width, fan_out=width))
        layers.append(LayerStats(name=f"relu{i}", module_type="ReLU", index=2 * i + 1, calls=1, role="activation",
                                 act=mom(f / math.sqrt(2), zero=0.5), grad=mom(b), nonlinearity=Nonlinearity("relu"),
                                 relu_family=True))
        i += 1
    return layers


def test_flat_chain_is_healthy_and_scale_follows_kaiming():
    rep = diagnose(StepStats(chain([1.4] * 8, [0.5] * 8)), CFG)
    assert rep.flagged == []
    assert rep["lin0"].nonlinearity == "relu"
    assert rep["lin0"].suggested_scale == pytest.approx(math.sqrt(2))


def test_forward_decay_is_blamed_on_the_first_layer_and_marks_the_whole_chain():
    fwd = [2 ** (-k / 2) for k in range(12)]  # 1/sqrt(2) per layer: 2**-5.5 over the 11 steps of the chain
    rep = diagnose(StepStats(chain(fwd, [1.0] * 12)), CFG)
    assert [r.name for r in rep.flagged if r.module_type == "Linear"] == [f"lin{k}" for k in range(12)]
    lead = rep["lin0"].findings[0]  # the first layer whose weights to change carries the chain's finding
    assert (lead.problem, lead.direction, lead.key, lead.threshold) == ("vanishing", "forward", "vanishing_ratio", 0.1)
    assert lead.value == pytest.approx(2 ** -5.5)
    assert lead.cause == "lin0" and lead.covers == 12
    assert "0.707× per layer" in lead.message
    f = rep["lin7"].findings[0]
    assert f.value == pytest.approx(2 ** -3.5) and f.cause == "lin0"  # the trend's value at its place
    # the ReLUs after the Linears drift the same way: blamed on the Linear that feeds the first of them
    assert all(f.cause == "lin0" for r in rep.flagged if r.module_type == "ReLU" for f in r.findings)


def test_one_odd_member_does_not_move_the_trend():
    fwd = [1.0] * 11 + [1e-4]  # a flat chain whose last member (an output head, say) is small
    assert diagnose(StepStats(chain(fwd, [1.0] * 12)), CFG).flagged == []


def test_backward_decay_towards_the_input_is_vanishing():
    bwd = [7.0 ** (k - 9) for k in range(10)]  # grows 7x per layer towards the output
    rep = diagnose(StepStats(chain([1.0] * 10, bwd)), CFG)
    lead = rep["lin0"].findings[0]
    assert (lead.problem, lead.direction) == ("vanishing", "backward")
    assert lead.value == pytest.approx(7.0 ** -9)
    assert rep["lin8"].findings[0].value == pytest.approx(1 / 7)


def test_growth_is_exploding():
    rep = diagnose(StepStats(chain([3.0 ** k for k in range(6)], [1.0] * 6)), CFG)
    assert rep["lin0"].findings[0].value == pytest.approx(3.0 ** 5)
    assert {r.name for r in rep.flagged if "exploding" in r.status} >= {f"lin{k}" for k in range(6)}


def test_a_mild_trend_inside_the_band_is_healthy():
    rep = diagnose(StepStats(chain([1.2 ** k for k in range(12)], [1.2 ** -k for k in range(12)])), CFG)
    assert rep.flagged == []  # 1.2**11 = 7.4x over 12 repeats: inside [0.1, 10]


def test_too_few_repeats_are_not_judged():
    rep = diagnose(StepStats(chain([1.0, 1e-3, 1e-6], [1.0] * 3)), CFG)
    assert rep.flagged == []


def test_zero_gradient_behind_zero_weights_is_a_note_not_vanishing():
    layers = chain([1.0] * 6, [0.0] * 6)
    layers.append(LayerStats(name="head", module_type="Linear", index=12, calls=1, role="weighted",
                             act=mom(0.0), grad=mom(1.0), weight_shape=(4, 64), weight_std=0.0,
                             weight_rms=0.0, fan_in=64, fan_out=4))
    rep = diagnose(StepStats(layers), CFG)
    assert rep.flagged == []
    assert any("because 'head' has all-zero weights" in n for n in rep["lin0"].notes)
    assert any("zero init" in n for n in rep.notes)


def test_first_nonfinite_is_the_culprit_and_later_layers_are_not_drift():
    fwd = [1.0, 1.0, 1.0, math.inf, math.nan, math.nan]
    layers = chain(fwd, [1.0] * 6)
    for s in layers:
        if not math.isfinite(s.act.rms):
            s.act.nonfinite = True
    rep = diagnose(StepStats(layers), CFG)
    assert rep.first_nonfinite == "lin3"
    assert rep["lin3"].findings[0].problem == "nonfinite"
    assert "exploding" not in rep["lin4"].status


def test_dead_and_saturated_thresholds():
    dead = LayerStats(name="r", module_type="ReLU", index=0, calls=1, role="activation", act=mom(0.01, zero=0.95),
                      relu_family=True, nonlinearity=Nonlinearity("relu"))
    half = LayerStats(name="r2", module_type="ReLU", index=1, calls=1, role="activation", act=mom(1, zero=0.6),
                      relu_family=True, nonlinearity=Nonlinearity("relu"))
    sat = LayerStats(name="t", module_type="Tanh", index=2, calls=1, role="activation", act=mom(0.9, sat=0.4),
                     bounded=True, nonlinearity=Nonlinearity("tanh"))
    rep = diagnose(StepStats([dead, half, sat]), CFG)
    assert rep["r"].status == {"dead"} and rep["r2"].status == set() and rep["t"].status == {"saturated"}
    assert rep["r"].findings[0].value == pytest.approx(0.95)
    loose = CFG.replace(dead_fraction=0.99, saturated_fraction=0.5)
    assert diagnose(StepStats([dead, half, sat]), loose).flagged == []


def test_normalised_layer_gets_no_scale():
    layers = [
        LayerStats(name="conv", module_type="Conv2d", index=0, calls=1, role="weighted", act=mom(5.0),
                   weight_shape=(8, 8, 3, 3), weight_std=0.5, weight_rms=1.0, fan_in=72, fan_out=72),
        LayerStats(name="bn", module_type="BatchNorm2d", index=1, calls=1, role="norm", act=mom(1.0)),
        LayerStats(name="relu", module_type="ReLU", index=2, calls=1, role="activation", act=mom(0.8, zero=0.5),
                   relu_family=True, nonlinearity=Nonlinearity("relu")),
    ]
    rep = diagnose(StepStats(layers), CFG)
    assert rep["conv"].nonlinearity == "relu"
    assert rep["conv"].suggested_scale == pytest.approx(math.sqrt(2 / 72) / 0.5)
    assert any("BatchNorm2d" in n for n in rep["conv"].notes)


def test_layers_feeding_a_norm_are_not_judged_forward_but_are_backward():
    # a norm divides the gradient into its input by that input's std: the gradient is 10**-k where the output is 10**k
    layers = chain([10.0 ** k for k in range(6)], [10.0 ** -k for k in range(6)])
    for s in layers:
        s.feeds_norm = s.module_type == "Linear"
        if s.module_type == "ReLU":
            s.grad = mom(1.0)
    rep = diagnose(StepStats(layers), CFG)
    assert all(r.status == set() for r in rep.layers if r.module_type == "Linear")
    assert "exploding" in rep["relu5"].status  # the ReLU outputs (not normalised) still drift
    layers = chain([1.0] * 6, [10.0 ** -k for k in range(6)][::-1])
    for s in layers:
        s.feeds_norm = s.module_type == "Linear"
    assert "vanishing" in diagnose(StepStats(layers), CFG)["lin0"].status


def test_lookups_recurrent_and_attention_get_no_textbook_scale():
    emb = LayerStats(name="emb", module_type="Embedding", index=0, calls=1, role="weighted", act=mom(1.0),
                     weight_shape=(100, 16), weight_std=1.0, weight_rms=4.0, fan_in=16, fan_out=100,
                     textbook=False)
    rep = diagnose(StepStats([emb]), CFG)
    assert rep["emb"].suggested_scale is None and rep["emb"].suggested_init is None
    assert any("rule does not describe it" in n for n in rep["emb"].notes)


def test_measured_and_textbook_scales_disagreeing_say_which_to_trust():
    layers = chain([1.4] * 4, [1.0] * 4)
    layers[0].input_rms = 1.0
    layers[0].act = mom(0.5)  # measured gain 0.5 where the weight std promises sqrt(2): not i.i.d.
    rep = diagnose(StepStats(layers), CFG)
    row = rep["lin0"]
    assert row.suggested_scale == pytest.approx(math.sqrt(2))
    assert row.measured_scale == pytest.approx(math.sqrt(2) / 0.5)
    assert any("disagree" in n and "Trust the measured one" in n for n in row.notes)
    assert not any("disagree" in n for n in rep["lin1"].notes)  # 1.4 / 1: within scale_tolerance


def test_functional_activation_inferred_from_the_next_input_probe():
    a = LayerStats(name="a", module_type="Linear", index=0, calls=1, role="weighted", act=mom(1.4),
                   weight_shape=(64, 64), weight_std=1 / 8, weight_rms=1.0, fan_in=64, fan_out=64)
    probe = Summary(n=1000, mean=0.56, std=0.82, rms=1.0, absmax=4.0, nonfinite=False, zero_fraction=0.5,
                    min=0.0, max=4.0)
    b = LayerStats(name="b", module_type="Linear", index=1, calls=1, role="weighted", act=mom(1.4),
                   weight_shape=(64, 64), weight_std=1 / 8, weight_rms=1.0, fan_in=64, fan_out=64,
                   input_probe=probe)
    rep = diagnose(StepStats([a, b]), CFG)
    assert rep["a"].nonlinearity == "relu" and rep["a"].suggested_scale == pytest.approx(math.sqrt(2))
    probe.min = -2.5  # a Gaussian-looking input: no activation ran
    assert diagnose(StepStats([a, b]), CFG)["a"].nonlinearity == "linear"


def _counting_chain(n):
    """n Linear/ReLU pairs with exact-zero gradients behind a zero-init head; counts reads of the weight rms."""
    reads = [0]

    class Counted(LayerStats):
        def __getattribute__(self, name):
            if name in ("weight_rms", "update_base_rms"):
                reads[0] += 1
            return object.__getattribute__(self, name)

    layers = [Counted(**{f.name: getattr(s, f.name) for f in dataclasses.fields(LayerStats)})
              for s in chain([1.0] * n, [0.0] * n)]
    layers.append(Counted(name="head", module_type="Linear", index=2 * n, calls=1, role="weighted", act=mom(0.0),
                          grad=mom(1.0), weight_shape=(4, 64), weight_std=0.0, weight_rms=0.0, fan_in=64, fan_out=4))
    return layers, reads


def test_the_diagnosis_is_linear_in_depth_with_zero_gradients():
    # issue #14 item 18: each layer asked "is any layer after me all-zero?" made a step quadratic in depth
    counts = []
    for n in (200, 400):
        layers, reads = _counting_chain(n)
        rep = diagnose(StepStats(layers), CFG)
        assert any("because 'head' has all-zero weights" in note for note in rep["lin0"].notes)
        counts.append(reads[0])
    assert counts[1] / counts[0] < 2.5, counts  # twice the layers, about twice the work (quadratic: 4x)


def test_a_nan_made_in_the_backward_pass_is_nonfinite_on_the_first_layer_it_reaches():
    layers = chain([1.0] * 6, [1.0] * 6)
    for s in layers[:8]:  # the gradient turned NaN at 'relu3' (index 7) and everything before it
        s.grad = mom(1.0, nonfinite=True)
    rep = diagnose(StepStats(layers), CFG)
    assert rep.first_nonfinite is None and rep.first_nonfinite_grad == "relu3"
    (f,) = rep["relu3"].findings
    assert (f.problem, f.direction) == ("nonfinite", "backward")
    assert all("nonfinite" in rep[f"lin{k}"].status for k in range(4))
    assert all(not rep[f"lin{k}"].findings or rep[f"lin{k}"].findings[0].problem != "nonfinite" for k in range(4))


def test_drift_slope_is_the_theil_sen_median_whether_lists_or_tensors(monkeypatch):
    """The chain's slope is the median of its pairwise slopes (Theil-Sen; statistics.median of every pair for a
    chain of one shape up to 64 members), the same to the bit from the list and the tensor code."""
    import random
    import statistics

    from torchdiag._diagnose import _drift as drift

    rng = random.Random(0)
    for n in (2, 3, 5, 24, 25, 40, 64, 65, 130, 500):
        for mixed in (False, True):
            xs = sorted(rng.sample(range(3 * n), n))
            ys = [rng.gauss(0.0, 1.0) - 0.05 * k for k in range(n)]
            shapes = [rng.choice([(8, 8), (16, 8), None]) for _ in range(n)] if mixed else [(8, 8)] * n
            got = {}
            for members in (0, 10_000):  # every chain through the tensors, then every chain through the lists
                monkeypatch.setattr(drift, "_LIST_MEMBERS", members)
                got[members] = drift._slope(xs, ys, shapes)
            assert got[0] == got[10_000], (n, mixed)
            if not mixed and n <= 64:
                pairs = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(n) for j in range(i + 1, n)]
                assert got[0] == statistics.median(pairs)
