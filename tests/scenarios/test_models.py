"""Real models and loop features: training is never broken and statistics stay right."""

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchdiag
from tests.helpers import zoo


def train_pair(make, data, steps=3, lr=0.01, **watch_kw):
    """Train a model with and without watch from the same seed; return both models and the last report."""
    torch.manual_seed(0)
    a = make()
    b = copy.deepcopy(a)
    reports = []
    for model, watched in ((a, False), (b, True)):
        torch.manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(2)
        ctx = torchdiag.watch(model, **watch_kw) if watched else None
        if ctx is not None:
            ctx.__enter__()
        try:
            for _ in range(steps):
                loss = data(model, g)
                loss.backward()
                opt.step()
                opt.zero_grad()
                if ctx is not None:
                    reports.append(ctx.step())
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb), "watch changed training"
    return b, reports[-1]


def seq_loss(model, g):
    x = torch.randn(8, 5, 16, generator=g)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    return out.pow(2).mean()


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_recurrent_modules(rnn):
    model, report = train_pair(lambda: rnn(16, 32, num_layers=2, batch_first=True), seq_loss)
    row = report[""]
    assert row.act_std is not None and row.grad_std is not None


def test_hand_written_rnn_cell_loop_merges_every_call():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.RNNCell(16, 16)

        def forward(self, x):
            h = torch.zeros(x.shape[0], 16)
            hs = []
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
                hs.append(h)
            return torch.stack(hs, 1)

    model, report = train_pair(Loop, seq_loss)
    assert report["cell"].calls == 5
    x = torch.randn(8, 5, 16)
    with torch.no_grad():
        hs = model(x)
    rep = torchdiag.check(model, x)
    assert rep["cell"].act_std == pytest.approx(hs.double().std(correction=0).item(), rel=1e-5)


def test_embedding_on_integer_input_and_sparse_gradients():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16, sparse=True)
            self.out = nn.Linear(16, 1)

        def forward(self, tokens):
            return self.out(self.emb(tokens).mean(1))

    def data(model, g):
        return model(torch.randint(0, 50, (8, 6), generator=g)).pow(2).mean()

    model, report = train_pair(Bag, data)
    assert report["emb"].act_std is not None and report["emb"].grad_std is not None
    assert report["emb"].gain is None  # integer input: no float statistics of the indices


def test_multihead_attention_owner_recorded_and_out_proj_reported_never_called():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            out, weights = self.mha(x, x, x)
            return out

    model, report = train_pair(Attn, seq_loss)
    assert report["mha"].act_std is not None and report["mha"].grad_std is not None
    assert any("mha.out_proj" in n and "never called" in n for n in report.notes)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_train_and_fast_path_eval(norm_first):
    make = lambda: nn.TransformerEncoder(  # noqa: E731
        nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first), 2,
        enable_nested_tensor=False)
    model, report = train_pair(make, seq_loss)
    assert report["layers.0.linear1"].grad_std is not None
    model.eval()
    with torchdiag.watch(model) as diag, torch.no_grad():
        model(torch.randn(2, 5, 16))  # fast path: not recorded, never an error
    assert diag.report().layers == []


def test_dict_and_dataclass_outputs_and_frozen_layers():
    @dataclass
    class Out:
        logits: torch.Tensor
        aux: int

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(16, 16).requires_grad_(False)
            self.a = nn.Linear(16, 8)
            self.b = nn.Linear(16, 8)

        def forward(self, x):
            h = self.frozen(x)
            return {"a": self.a(h), "rest": Out(self.b(h), 3)}

    def data(model, g):
        out = model(torch.randn(4, 16, generator=g))
        return out["a"].sum() + out["rest"].logits.pow(2).sum()

    model, report = train_pair(Net, data)
    assert report["frozen"].grad_std is None  # nothing flows to a frozen first layer: not measurable
    assert report["frozen"].act_std is not None and report["b"].grad_std is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_forward_once(reentrant):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=reentrant))

    def data(model, g):
        return model(torch.randn(4, 16, generator=g).requires_grad_(reentrant)).pow(2).mean()

    model, report = train_pair(Net, data)
    assert report["block.0"].calls == 1
    assert report["block.0"].grad_std is not None and report["block.0"].act_std is not None


def test_channels_last_resnet_statistics_match_contiguous():
    torch.manual_seed(0)
    model = zoo.ResNet()
    x = torch.randn(4, 3, 32, 32)
    ref = torchdiag.check(model, x)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    rep = torchdiag.check(model_cl, x.to(memory_format=torch.channels_last))
    for a, b in zip(ref.layers, rep.layers):
        assert a.name == b.name
        assert b.act_std == pytest.approx(a.act_std, rel=1e-4)


def test_resnet_trains_bit_identical_with_watch():
    def data(model, g):
        return F.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g)), torch.randint(0, 10, (4,), generator=g))

    train_pair(zoo.ResNet, data, steps=2)


def test_double_backward_gradient_penalty_is_accounted():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    with torchdiag.watch(model) as diag:
        x = torch.randn(4, 8, requires_grad=True)
        out = model(x).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        (out + gx.pow(2).sum()).backward()
        rep = diag.step()
    assert rep["0"].calls == 1 and rep["0"].grad_std is not None


def test_non_tensor_outputs_are_skipped():
    class Odd(nn.Module):
        def forward(self, x):
            return None

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = Odd()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.odd(x)
            mask = x > 0
            return self.lin(x) * mask

    rep = torchdiag.check(Net(), torch.randn(3, 4))
    assert rep["odd"].act_std is None and rep["lin"].act_std is not None


def test_jit_script_and_trace_of_a_watched_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model):
            scripted = torch.jit.script(model)
            traced = torch.jit.trace(model, torch.randn(2, 4))
    x = torch.randn(2, 4)
    assert torch.equal(scripted(x), model(x)) and torch.equal(traced(x), model(x))


def test_torch_export_of_a_watched_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    with torchdiag.watch(model) as diag:
        ep = torch.export.export(model, (x,))
    assert torch.equal(ep.module()(x), model(x))
    assert diag.report().layers == []  # fake tensors of the export trace are never recorded


def test_torch_compile_statistics_equal_eager_without_recompiling():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    eager = torchdiag.check(model, x, loss_fn=lambda out: out.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that global hooks also see the OptimizedModule
        compiled = torch.compile(model)
        with torchdiag.watch(model) as diag:
            compiled(x).sum().backward()
            first = diag.step()
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            for _ in range(3):
                compiled(x).sum().backward()
                diag.step()
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "recompiled per step"
    for a, b in zip(eager.layers, first.layers):
        assert a.name == b.name
        assert b.act_std == pytest.approx(a.act_std, rel=1e-5)
        assert b.grad_std == pytest.approx(a.grad_std, rel=1e-5)
    model.zero_grad()


def test_packed_sequence_namedtuple_and_keyword_only_inputs():
    from collections import namedtuple

    from torch.nn.utils.rnn import pack_padded_sequence

    Pair = namedtuple("Pair", "out aux")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, *, x, lengths):
            packed, _ = self.lstm(pack_padded_sequence(x, lengths, batch_first=True))
            return Pair(self.head(packed.data), lengths)

    model = Net()
    x, lengths = torch.randn(4, 6, 8), torch.tensor([6, 5, 3, 2])
    with torchdiag.watch(model) as diag:
        model(x=x, lengths=lengths).out.pow(2).sum().backward()
        rep = diag.step()
    with torch.no_grad():
        packed, (h, c) = model.lstm(pack_padded_sequence(x, lengths, batch_first=True))
    # the LSTM's output: the PackedSequence's float data and the (h, c) tuple count; batch_sizes do not
    both = torch.cat([packed.data.reshape(-1), h.reshape(-1), c.reshape(-1)]).double()
    assert rep["lstm"].act_std == pytest.approx(both.std(correction=0).item(), rel=1e-5)
    assert rep["head"].grad_std is not None


def test_inference_mode_and_retain_graph():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 8)
    with torchdiag.watch(model) as diag:
        out = model(x).sum()
        out.backward(retain_graph=True)
        out.backward()  # a second backward through the same graph adds to the gradient statistics
        with torch.inference_mode():
            model(torch.randn(16, 8) * 1e3)  # not recorded
        rep = diag.step()
    assert rep["0"].calls == 1
    y = model[0](x).detach().double()
    assert rep["0"].act_std == pytest.approx(y.std(correction=0).item(), rel=1e-5)
    single = torchdiag.check(model, x, loss_fn=lambda o: o.sum())
    assert rep["0"].grad_std == pytest.approx(single["0"].grad_std, rel=1e-5)  # two identical passes: same std
    assert rep["0"].grad_norm == pytest.approx(single["0"].grad_norm * 2 ** 0.5, rel=1e-5)  # twice the elements
