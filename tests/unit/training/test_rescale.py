"""Gradient rescale (watch(rescale_grads=...)): the fan_out/fan_in backward drift of a fan_in init, undone.

With He's fan_in init each layer multiplies the backward variance by fan_out/fan_in
(reference/000, reference/003), so on a net widening 64 -> 2048 the gradient std at the layer
outputs grows by sqrt(2) per layer towards the input: a 4x spread over 5 layers. The hook
multiplies each weighted layer's output gradient by sqrt(fan_in/fan_out). Every factor is checked
against the plain gradients of the same model: rescaled weight gradients are the product of the
factors from that layer to the output, times the plain ones.
"""

import copy
import math

import pytest
import torch
from torch import nn

import torchdiag

DIMS = [64, 128, 256, 512, 1024, 2048]


def widening() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(DIMS[:-1], DIMS[1:])):
        lin = nn.Linear(a, b)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")  # mode='fan_in'
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(DIMS) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def linears(model):
    return [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]


def hooks_left(model: nn.Module) -> list:
    glob = nn.modules.module
    left = list(glob._global_forward_hooks.values()) + list(glob._global_forward_pre_hooks.values())
    for m in model.modules():
        left += list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
    return left


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, DIMS[0], generator=g), torch.randn(64, DIMS[-1], generator=g)


def step(model, batch, rescale):
    """One watched forward/backward with the loss sum(out * r): the gradient at the output is r (std 1)."""
    x, r = batch
    model.zero_grad(set_to_none=True)
    with torchdiag.watch(model, rescale_grads=rescale) as diag:
        out = model(x)
        (out * r).sum().backward()
        report = diag.step()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), report, grads


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 summation order, judged against the tensor's own scale."""
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), (err, want.abs().max().item())


def spread(report, model) -> float:
    stds = [report[name].grad_std for name, _ in linears(model)]
    return max(stds) / min(stds)


def expected_grads(plain, model, factor_of):
    """Rescaled grads of layer l = plain grads × the product of the factors of layers l..L."""
    names = [name for name, _ in linears(model)]
    out = {}
    for i, name in enumerate(names):
        k = math.prod(factor_of(n) for n in names[i:])
        for p in ("weight", "bias"):
            out[f"{name}.{p}"] = plain[f"{name}.{p}"] * k
    return out


def test_fan_ratio_rescale_flattens_the_gradient_std_of_a_widening_net(batch):
    model = widening()
    out_plain, plain_report, plain = step(model, batch, False)
    out_rescaled, report, rescaled = step(model, batch, True)

    # without: sqrt(fan_out/fan_in) = sqrt(2) per layer over 4 steps: 4x (He et al. 2015 backward form)
    assert 3.4 < spread(plain_report, model) < 4.7, [plain_report[n].grad_std for n, _ in linears(model)]
    # with: flat within 30 %
    assert spread(report, model) < 1.3, [report[n].grad_std for n, _ in linears(model)]
    # the forward pass is bit-identical
    assert torch.equal(out_plain, out_rescaled)
    # every weight gradient is the plain one times the product of sqrt(fan_in / fan_out) down to it
    fans = {name: (m.in_features, m.out_features) for name, m in linears(model)}
    want = expected_grads(plain, model, lambda n: math.sqrt(fans[n][0] / fans[n][1]))
    for name, g in want.items():
        close(rescaled[name], g)
    # the report says so
    assert report.rescale_grads is True and plain_report.rescale_grads is False
    assert report.to_dict()["rescale_grads"] is True
    assert "gradient rescale ON" in str(report) and "gradient rescale ON" not in str(plain_report)
    assert hooks_left(model) == []


def test_a_float_factor_compounds_once_per_layer(batch):
    model = widening()
    out_plain, _, plain = step(model, batch, False)
    out, report, rescaled = step(model, batch, 0.5)
    assert torch.equal(out, out_plain)
    want = expected_grads(plain, model, lambda n: 0.5)
    for name, g in want.items():
        close(rescaled[name], g)
    assert report.rescale_grads is True
    assert hooks_left(model) == []


def test_a_callable_chooses_per_layer(batch):
    model = widening()
    factors = {"0": 2.0, "2": 1.0, "4": 0.25, "6": 3.0, "8": 0.5}
    seen = []

    def choose(name, module):
        seen.append((name, module))
        return factors[name]

    _, _, plain = step(model, batch, False)
    _, report, rescaled = step(model, batch, choose)
    assert [(n, m) for n, m in seen] == linears(model)  # called once per weighted layer, with the module itself
    want = expected_grads(plain, model, factors.__getitem__)
    for name, g in want.items():
        close(rescaled[name], g)
    assert report.rescale_grads is True


def test_after_the_watch_gradients_are_plain_again_and_no_hook_is_left(batch):
    model = widening()
    _, _, plain = step(model, batch, False)
    step(model, batch, True)
    assert hooks_left(model) == []
    x, r = batch
    model.zero_grad(set_to_none=True)
    (model(x) * r).sum().backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, plain[name]), name


def test_a_deepcopy_made_inside_the_watch_is_never_rescaled(batch):
    # EMA models are deep copies: a per-module hook would be copied into them and never removed
    model = widening()
    x, r = batch
    with torchdiag.watch(model, rescale_grads=True):
        twin = copy.deepcopy(model)
        (twin(x) * r).sum().backward()
        inside = {name: p.grad.clone() for name, p in twin.named_parameters()}
    assert hooks_left(twin) == [] and hooks_left(model) == []
    _, _, plain = step(model, batch, False)
    for name, g in inside.items():
        close(g, plain[name])


def test_rescale_true_uses_per_block_fans_and_never_guesses():
    # MultiheadAttention: in_proj_weight is 3 stacked (E, E) blocks, so fan_in = fan_out = E and the factor is 1;
    # a module torchdiag does not know has no fans, so it gets no factor (rather than a guessed one)
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 64) / 4)

        def forward(self, x):
            return x @ self.w

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.custom = Custom()

        def forward(self, x):
            return self.custom(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model = Net()
    x, r = torch.randn(4, 5, 16), torch.randn(4, 5, 64)
    grads = []
    for rescale in (False, True):
        model.zero_grad(set_to_none=True)
        with torchdiag.watch(model, rescale_grads=rescale) as diag:
            (model(x) * r).sum().backward()
            report = diag.step()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert report["attn"].fan_in == 16 and report["attn"].fan_out == 16
    assert report["custom"].fan_in is None
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


class _ReturnsItsWeight(nn.Module):
    """A weighted module whose output is its own parameter (a learned table through Dropout(0.0)): the output
    tensor outlives every step."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return x @ self.drop(self.weight)


def test_a_persistent_output_tensor_is_scaled_once_per_step_and_never_after_the_watch():
    # issue #14 item 3: one more register_hook per step on the parameter compounded the factor (x2, x4, x8...)
    torch.manual_seed(0)
    model = nn.Sequential(_ReturnsItsWeight())
    x = torch.randn(3, 4)

    def grad_now():
        model.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        return model[0].weight.grad.clone()

    plain = grad_now()
    with torchdiag.watch(model, rescale_grads=2.0) as diag:
        for _ in range(4):
            # the output of module '0' is x @ W (a new tensor) and Dropout's output is W itself (a leaf):
            # only '0' is weighted, so the factor 2 applies once to the gradient of x @ W
            assert torch.equal(grad_now(), plain * 2)
            diag.step()
    assert torch.equal(grad_now(), plain)  # nothing left after the watch
    assert not model[0].weight._backward_hooks


class _WeightAsOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))
        self.drop = nn.Dropout(0.0)

    def forward(self):
        return self.drop(self.weight)  # Dropout(0.0) returns its input: the parameter itself


def test_a_weighted_module_returning_its_parameter_is_scaled_once_per_step():
    torch.manual_seed(0)
    model = _WeightAsOutput()
    r = torch.randn(4, 8)

    def grad_now():
        model.zero_grad(set_to_none=True)
        (model() * r).sum().backward()
        return model.weight.grad.clone()

    assert torch.equal(grad_now(), r)
    with torchdiag.watch(model, rescale_grads=3.0) as diag:
        for _ in range(4):
            assert torch.equal(grad_now(), r * 3.0)  # not 3, 9, 27, 81
            diag.step()
    assert torch.equal(grad_now(), r)
    assert not model.weight._backward_hooks
