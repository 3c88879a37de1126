"""fix_init: data-driven, layer-by-layer rescale (LSUV, Mishkin & Matas 2016) on the user's own batch.

Output stds are checked with plain tensor ops on the model's own forward (hooks registered by the
test on a copy), not with torchdiag's statistics.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiag
from torchdiag import TorchDiagError

WEIGHTED = (nn.Linear, nn.Conv2d)


def xavier_mlp(depth=30, width=256) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)  # default bias U(-1/16, 1/16): kept
        nn.init.xavier_normal_(lin.weight)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers)


class PreActBlock(nn.Module):
    """BN -> ReLU -> conv1 -> BN -> ReLU -> conv2, plus the shortcut (He et al. 2016, identity mappings).

    conv1 feeds BatchNorm only; conv2 and the projection shortcut feed the residual sum.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, widths=(16, 32), blocks=3, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(PreActBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def hooks_left(model: nn.Module) -> list:
    glob = nn.modules.module
    left = [*glob._global_forward_hooks.values(), *glob._global_forward_pre_hooks.values(),
            *glob._global_backward_hooks.values()]
    for m in model.modules():
        left += [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values()]
    if torch._C._len_torch_function_stack():
        left.append("a torch function mode")
    return left


def output_stds(model: nn.Module, *inputs, types=WEIGHTED + (nn.BatchNorm2d,)) -> dict[str, float]:
    """Population std of every listed module's output, by a plain tensor op, on a copy of the model."""
    twin = copy.deepcopy(model)
    stds: dict[str, float] = {}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: stds.__setitem__(n, out.std(correction=0).item()))
               for n, m in twin.named_modules() if isinstance(m, types)]
    with torch.no_grad():
        twin(*inputs)
    for h in handles:
        h.remove()
    return stds


def state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def test_a_30_layer_xavier_relu_mlp_is_made_healthy():
    model = xavier_mlp()
    x = torch.randn(128, 256)
    before = torchdiag.check(model, x)
    assert any("vanishing" in layer.status for layer in before.layers)  # He et al. 2015: 1/sqrt(2) per layer

    report = torchdiag.fix_init(model, x)

    assert report.flagged == [], str(report)
    stds = output_stds(model, x)
    assert len(stds) == 30
    for name, std in stds.items():
        assert 0.5 <= std <= 2.0, (name, std)
        assert abs(std - 1.0) < 0.1 + 1e-4, (name, std)  # the tolerance it iterated to, on this same batch
        assert report[name].act_std == pytest.approx(std, rel=1e-3)
    assert any("rescaled 30 layer(s)" in n for n in report.notes), report.notes
    assert hooks_left(model) == []


def test_target_std_and_tol_are_honoured():
    model = xavier_mlp(depth=8, width=64)
    x = torch.randn(256, 64)
    torchdiag.fix_init(model, x, target_std=0.5, tol=0.02)
    for name, std in output_stds(model, x).items():
        assert abs(std - 0.5) < 0.02 * 0.5 + 1e-5, (name, std)


def test_a_resnet_with_batchnorm_in_train_mode():
    torch.manual_seed(0)
    model = PreActResNet().train()
    x = torch.randn(32, 3, 16, 16)
    params_before, modes = state(model)
    buffers = [b.clone() for b in model.buffers()]
    stds_before = output_stds(model, x)
    fed_to_bn = [n for n, m in model.named_modules() if n.endswith("conv1")]
    rescaled = [n for n, m in model.named_modules() if isinstance(m, WEIGHTED) and n not in fed_to_bn]
    # PyTorch's default init (std 1/sqrt(3 fan_in)) leaves the residual path at ~0.4
    assert min(stds_before[n] for n in rescaled) < 0.5

    report = torchdiag.fix_init(model, x)

    assert report.flagged == [], str(report)
    stds = output_stds(model, x)
    for name in rescaled:  # stem, conv2, the projection shortcut, fc
        assert 0.5 <= stds[name] <= 2.0, (name, stds[name])
        assert abs(stds[name] - 1.0) < 0.1 + 1e-4, (name, stds[name])
    for name in fed_to_bn:  # BatchNorm undoes any scale: left as they were, and what comes out of the BN is at 1
        assert torch.equal(model.get_submodule(name).weight, params_before[name + ".weight"]), name
        bn = name.replace("conv1", "bn2")
        assert stds[bn] == pytest.approx(1.0, abs=0.02), bn
    assert any("only into a normalisation layer" in n and "blocks.0.conv1" in n for n in report.notes)
    # BatchNorm running statistics and every module's mode are as they were; nothing is left attached
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert [m.training for m in model.modules()] == modes
    assert hooks_left(model) == []


def test_a_resnet_in_eval_mode_rescales_the_convs_before_batchnorm():
    # an eval-mode BatchNorm applies its running statistics (a fixed affine map): it does not undo a scale,
    # so the conv before it is rescaled too. randn weights explode the residual sum block after block.
    torch.manual_seed(0)
    model = PreActResNet()
    for m in model.modules():
        if isinstance(m, WEIGHTED):
            nn.init.normal_(m.weight)
    model.eval()
    x = torch.randn(32, 3, 16, 16)
    buffers = [b.clone() for b in model.buffers()]
    assert torchdiag.check(model, x).flagged, "randn weights must be flagged before the fix"

    report = torchdiag.fix_init(model, x)

    assert report.flagged == [], str(report)
    stds = output_stds(model, x, types=WEIGHTED)
    assert len(stds) == 15
    for name, std in stds.items():
        assert 0.5 <= std <= 2.0, (name, std)
    assert all(not m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert hooks_left(model) == []


def test_what_feeds_a_normalisation_layer_is_traced_through_the_ops():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)  # -> LayerNorm only
            self.ln_a = nn.LayerNorm(16)
            self.b = nn.Linear(16, 16)  # -> Dropout -> view -> LayerNorm: still only normalised
            self.drop = nn.Dropout(0.1)
            self.ln_b = nn.LayerNorm(16)
            self.c = nn.Linear(16, 16)  # -> LayerNorm and a residual sum: its scale matters
            self.ln_c = nn.LayerNorm(16)

        def forward(self, x):
            h = torch.relu(self.ln_a(self.a(x)))
            h = torch.relu(self.ln_b(self.drop(self.b(h)).view(-1, 16)))
            c = self.c(h)
            return self.ln_c(c) + c

    torch.manual_seed(0)
    model = Net()
    for m in (model.a, model.b, model.c):
        nn.init.normal_(m.weight, std=3.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.randn(64, 16)
    report = torchdiag.fix_init(model, x)
    assert torch.equal(model.a.weight, before["a.weight"])
    assert torch.equal(model.b.weight, before["b.weight"])
    assert not torch.equal(model.c.weight, before["c.weight"])
    assert output_stds(model, x, types=(nn.Linear,))["c"] == pytest.approx(1.0, abs=0.1)
    assert any("'a', 'b' unchanged" in n for n in report.notes), report.notes


def test_zero_init_frozen_and_biases():
    torch.manual_seed(0)
    model = xavier_mlp(depth=6, width=64)
    head = nn.Linear(64, 10)
    nn.init.zeros_(head.weight)
    model.append(head)
    model[2].weight.requires_grad_(False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.randn(128, 64)

    report = torchdiag.fix_init(model, x)
    assert torch.equal(model[-1].weight, before["12.weight"])  # zero init on purpose: left alone
    assert torch.equal(model[2].weight, before["2.weight"])  # frozen
    assert any("all-zero weights" in n for n in report.notes) and any("frozen" in n for n in report.notes)
    for i in (4, 6, 8, 10):  # (layer 0 already gives std 1 on this batch: Xavier on a square layer)
        assert not torch.equal(model[i].weight, before[f"{i}.weight"])
        assert torch.equal(model[i].bias, before[f"{i}.bias"])  # biases kept by default

    torchdiag.fix_init(model, x, zero_bias=True)
    for i in (0, 4, 6, 8, 10):
        assert torch.count_nonzero(model[i].bias) == 0
    assert torch.equal(model[2].bias, before["2.bias"])  # not a layer it rescales


def test_rng_state_and_modes_are_untouched():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 32), nn.Dropout(0.2))
    model.train()
    model[4].eval()
    modes = [m.training for m in model.modules()]
    x = torch.randn(64, 32)
    rng = torch.get_rng_state()
    torchdiag.fix_init(model, x)
    assert torch.equal(rng, torch.get_rng_state())
    assert [m.training for m in model.modules()] == modes


def test_a_batch_the_model_cannot_run_is_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    params, modes = state(model)
    with pytest.raises(TorchDiagError) as info:
        torchdiag.fix_init(model, torch.randn(3, 5))
    msg = str(info.value)
    assert "Sequential" in msg and "[3, 5]" in msg and "RuntimeError" in msg
    assert isinstance(info.value.__cause__, RuntimeError)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    assert hooks_left(model) == []


def test_a_model_that_raises_after_a_layer_was_rescaled_is_an_error_and_leaves_no_hook():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise ValueError("only once")
            return self.lin(x)

    model = nn.Sequential(Fails())
    with pytest.raises(TorchDiagError, match="Sequential.*ValueError: only once"):
        torchdiag.fix_init(model, torch.randn(2, 4))
    assert hooks_left(model) == []


@pytest.mark.parametrize("kwargs, error", [
    ({"target_std": 0.0}, ValueError), ({"tol": -1.0}, ValueError), ({"max_iter": 0}, ValueError),
    ({"target_std": float("nan")}, ValueError),
])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        torchdiag.fix_init(nn.Linear(2, 2), torch.randn(2, 2), **kwargs)


def test_a_watched_model_is_refused_before_anything_changes():
    model = xavier_mlp(depth=4, width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torchdiag.watch(model), pytest.raises(TorchDiagError, match="being watched"):
        torchdiag.fix_init(model, torch.randn(8, 16))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_not_a_module_or_no_batch():
    with pytest.raises(TypeError, match="nn.Module"):
        torchdiag.fix_init(lambda x: x, torch.randn(2, 2))
    with pytest.raises(TypeError, match="sample batch"):
        torchdiag.fix_init(nn.Linear(2, 2))


def test_apply_suggestions_names_a_wrong_argument():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"apply_suggestions\(report=...\): expected a torchdiag.Report.*got str"):
        torchdiag.apply_suggestions(model, "str")
    with pytest.raises(TypeError, match=r"apply_suggestions\(model=...\): expected a torch.nn.Module"):
        torchdiag.apply_suggestions("model", torchdiag.check(model, torch.randn(2, 4)))


def _output_std_less_bias(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Each Linear's output std less its bias on ``x`` (the part its weight makes), with plain hooks."""
    stds, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(mod, args, out, name=name):
                stds[name] = (out - mod.bias).double().std(correction=0).item()
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return stds


@pytest.mark.parametrize("case", ["all-zero batch", "dead relu"])
def test_fix_init_on_a_degenerate_batch_leaves_layers_with_no_output_std_unchanged_and_says_so(case):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    if case == "all-zero batch":
        x = torch.zeros(64, 16)
    else:
        with torch.no_grad():
            model[0].bias.fill_(-100.0)  # every unit of the first ReLU dead on this batch
    flat = {n for n, s in _output_std_less_bias(model, x).items() if s == 0.0}
    assert flat >= {"0"} if case == "all-zero batch" else flat >= {"2"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = torchdiag.fix_init(model, x)
    for name in flat:
        assert torch.equal(model.get_submodule(name).weight, before[f"{name}.weight"])
    note = next(n for n in report.notes if "no scaling can fix" in n)
    assert all(f"'{name}'" in note for name in flat) and "unchanged" in note
    rescaled = next((n for n in report.notes if n.startswith("fix_init: rescaled")), "")
    assert f"rescaled {3 - len(flat)} layer(s)" in rescaled or (not rescaled and len(flat) == 3)
    for p in model.parameters():  # nothing blown up anywhere
        assert p.abs().max() < 1e3
