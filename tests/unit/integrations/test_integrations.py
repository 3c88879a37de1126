"""The Lightning and Hugging Face callbacks, run inside the real frameworks on CPU.

The statistics the callbacks record are checked against the test's own hooks on the same forward and
backward passes; steps against the frameworks' optimizer-step counters; TensorBoard events are read back
with TensorBoard's own reader; and training with the callback gives bit-identical weights to training
without it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import torchdiag


# ---------------------------------------------------------------------------------------------- helpers
class OwnStats:
    """The test's own record of one module's output and output gradient, per grad-enabled forward call."""

    def __init__(self, module: nn.Module) -> None:
        self.outs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if torch.is_grad_enabled():  # validation / no_grad forwards are not training steps
            self.outs.append(out.detach().double().flatten())
            out.register_hook(lambda g: self.grads.append(g.detach().double().flatten()))

    @staticmethod
    def std(chunks: list[torch.Tensor]) -> float:
        return torch.cat(chunks).std(correction=0).item()

    def last(self, calls: int = 1) -> tuple[float, float]:
        """(act std, grad std) pooled over the last ``calls`` forward calls."""
        return self.std(self.outs[-calls:]), self.std(self.grads[-calls:])


def event_scalars(logdir: str) -> dict[str, list]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def assert_unwatched(model: nn.Module) -> None:
    """Every hook is gone: a new watch of the same model is allowed (a nested one raises)."""
    with torchdiag.watch(model):
        pass


def deep_relu(depth: int = 6, width: int = 16, std: float | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if std is not None:
            nn.init.normal_(lin.weight, std=std)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 2))


# ---------------------------------------------------------------------------------------------- Lightning
try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from torchdiag.integrations.lightning import TorchDiagCallback
except ImportError:  # the Lightning tests skip; the transformers ones still run
    pl = None
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

needs_lightning = pytest.mark.skipif(pl is None, reason="pip install lightning")
_LightningModule = pl.LightningModule if pl is not None else nn.Module


class Classifier(_LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        self.fail_at = fail_at

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom in training_step")
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(n: int = 64, batch: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=batch)


def trainer(tmp_path, callbacks=(), logger=True, **kwargs):
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="run") if logger is True else logger
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=logger, callbacks=list(callbacks),
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      log_every_n_steps=1, **kwargs)


@pytest.fixture(autouse=True)
def _quiet_frameworks():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="transformers")
        warnings.filterwarnings("ignore", module="accelerate")
        yield


@needs_lightning
def test_lightning_records_each_optimizer_step_into_the_trainers_tensorboard_logger(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    own = OwnStats(model.net[2])
    callback = TorchDiagCallback()
    tr = trainer(tmp_path, [callback], limit_val_batches=2)
    tr.fit(model, loader(), loader(32, seed=1))

    assert tr.global_step == 4 and callback.watcher.step_count == 4
    report = callback.report()
    assert report.step == 3 and [x.name for x in report.layers] == ["net.0", "net.1", "net.2", "net.3", "net.4"]
    act_std, grad_std = own.last()  # the last training batch; validation ran after it under no_grad
    assert len(own.outs) == 4
    assert report["net.2"].act_std == pytest.approx(act_std, rel=1e-5)
    assert report["net.2"].grad_std == pytest.approx(grad_std, rel=1e-5)
    assert report["net.2"].calls == 1

    # torchdiag wrote into Lightning's own run, next to Lightning's metrics, one event per optimizer step
    run = tr.logger.log_dir
    scalars = event_scalars(run)
    assert "train_loss" in scalars and "val_loss" in scalars
    # (the stds as their log10 twins at every recorded step; the raw figures at the histogram steps)
    assert [e.step for e in scalars["log10_act_std/net.2"]] == [0, 1, 2, 3]
    assert 10 ** scalars["log10_act_std/net.2"][-1].value == pytest.approx(act_std, rel=1e-5)
    # Lightning's writer was left to Lightning; torchdiag's hooks are gone
    assert_unwatched(model)
    own.handle.remove()


@needs_lightning
def test_lightning_training_is_unchanged_by_the_callback(tmp_path):
    weights = []
    for callbacks in ([], [TorchDiagCallback(every=2)]):
        pl.seed_everything(0, verbose=False)
        model = Classifier()
        trainer(tmp_path, callbacks, logger=False).fit(model, loader())
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


@needs_lightning
def test_lightning_gradient_accumulation_is_one_step_per_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    own = OwnStats(model.net[0])
    callback = TorchDiagCallback()
    tr = trainer(tmp_path, [callback], logger=False, accumulate_grad_batches=2)
    tr.fit(model, loader(n=96))  # 6 batches, 3 optimizer steps

    assert tr.global_step == 3 and callback.watcher.step_count == 3
    report = callback.report()
    assert report.step == 2
    assert all(layer.calls == 2 for layer in report.layers)
    act_std, grad_std = own.last(calls=2)  # both micro-batches of the last optimizer step, pooled
    assert report["net.0"].act_std == pytest.approx(act_std, rel=1e-5)
    assert report["net.0"].grad_std == pytest.approx(grad_std, rel=1e-5)
    own.handle.remove()


@needs_lightning
def test_lightning_fp16_amp_gradients_are_reported_unscaled(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    try:
        torchdiag.watch(nn.Linear(2, 2), scaler=torch.amp.GradScaler("cpu"))
    except NotImplementedError:
        pytest.skip("this torchdiag's watch() has no scaler= yet")
    scale = 2.0 ** 10
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000)
    torch.manual_seed(0)
    model = Classifier()
    own = OwnStats(model.net[2])
    callback = TorchDiagCallback()
    tr = trainer(tmp_path, [callback], logger=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    tr.fit(model, loader())
    assert tr.global_step == 4 and callback.watcher.step_count == 4
    assert scaler.get_scale() == scale  # no overflow: the same scale in every backward
    act_std, scaled_grad_std = own.last()
    report = callback.report()
    assert report["net.2"].act_std == pytest.approx(act_std, rel=1e-3)
    assert report["net.2"].grad_std == pytest.approx(scaled_grad_std / scale, rel=1e-3)
    own.handle.remove()


@needs_lightning
def test_lightning_exception_in_training_leaves_no_hook(tmp_path):
    model = Classifier(fail_at=2)
    callback = TorchDiagCallback()
    with pytest.raises(RuntimeError, match="boom in training_step"):
        trainer(tmp_path, [callback]).fit(model, loader())
    assert callback.watcher.step_count == 2  # batches 0 and 1 stepped
    assert callback.report().step == 1
    assert_unwatched(model)


class _FakeTrainer(SimpleNamespace):
    """The attributes of a Lightning Trainer the callback reads, for a rank a single process cannot be."""


@needs_lightning
@pytest.mark.parametrize("rank", [0, 1])
def test_lightning_only_global_rank_zero_warns_and_writes(tmp_path, rank):
    torch.manual_seed(0)
    model = deep_relu(std=0.01)  # vanishing: rank 0 warns
    written = []
    writer = SimpleNamespace(add_scalar=lambda *a, **k: written.append(a), flush=lambda: None)
    logger = type("TensorBoardLogger", (), {"experiment": writer})()
    fake = _FakeTrainer(is_global_zero=rank == 0, loggers=[logger], precision_plugin=SimpleNamespace(scaler=None))
    callback = TorchDiagCallback()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_fit_start(fake, model)
        for _ in range(2):
            model(torch.randn(16, 16)).sum().backward()
            callback.on_before_optimizer_step(fake, model, opt)
            opt.step()
            opt.zero_grad()
            callback.on_train_batch_end(fake, model, None, None, 0)
        callback.on_train_end(fake, model)
    ours = [w for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    assert callback.watcher.step_count == 2
    assert callback.report().flagged  # every rank diagnoses
    if rank == 0:
        assert ours and written
    else:
        assert not ours and not written
    assert_unwatched(model)


@needs_lightning
def test_lightning_callback_rejects_bad_arguments_when_built():
    with pytest.raises(TypeError, match="evry"):
        TorchDiagCallback(evry=2)
    with pytest.raises(TypeError, match="model"):
        TorchDiagCallback(model=nn.Linear(2, 2))
    with pytest.raises(torchdiag.ConfigError, match="vanishing_ratoi"):
        TorchDiagCallback(config={"vanishing_ratoi": 0.1})


@needs_lightning
def test_pytorch_lightning_trainer_accepts_the_callback(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning")

    class OldStyle(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = TorchDiagCallback()
    assert isinstance(callback, ptl.Callback) and isinstance(callback, pl.Callback)
    tr = ptl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, callbacks=[callback],
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    tr.fit(OldStyle(), loader())
    assert tr.global_step == 4 and callback.watcher.step_count == 4


# ---------------------------------------------------------------------------------------------- transformers
def _gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers", reason="pip install transformers accelerate")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seq: int = 16) -> None:
        self.ids = torch.randint(0, 100, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_train(model, output_dir, callbacks, **kwargs):
    transformers = pytest.importorskip("transformers")
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    cpu = {"use_cpu": True} if "use_cpu" in fields else {"no_cuda": True}
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0, **cpu, **kwargs)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.fixture
def hf_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")


def test_hf_trainer_records_each_optimizer_step_and_writes_tensorboard(tmp_path, hf_offline):
    from torchdiag.integrations.transformers import TorchDiagCallback as HFCallback
    from torchdiag.integrations.transformers import default_logdir

    model = _gpt2()
    layer = "transformer.h.1.mlp.c_fc"
    own = OwnStats(model.get_submodule(layer))
    callback = HFCallback()  # default logdir: <logging dir>/torchdiag
    trainer = _hf_train(model, tmp_path / "out", [callback], gradient_accumulation_steps=2)

    assert trainer.state.global_step == 3 and callback.watcher.step_count == 3
    report = callback.report()
    assert report.step == 2 and report[layer].calls == 2  # two micro-batches per optimizer step
    assert len(own.outs) == 6
    act_std, grad_std = own.last(calls=2)
    assert report[layer].act_std == pytest.approx(act_std, rel=1e-5)
    assert report[layer].grad_std == pytest.approx(grad_std, rel=1e-5)

    logdir = default_logdir(trainer.args)
    assert logdir.endswith(os.path.join("", "torchdiag")) and str(tmp_path) in os.path.abspath(logdir)
    scalars = event_scalars(logdir)
    assert [e.step for e in scalars[f"log10_act_std/{layer}"]] == [0, 1, 2]
    assert 10 ** scalars[f"log10_act_std/{layer}"][-1].value == pytest.approx(act_std, rel=1e-5)
    assert_unwatched(model)
    own.handle.remove()


def test_hf_training_is_unchanged_by_the_callback(tmp_path, hf_offline):
    from torchdiag.integrations.transformers import TorchDiagCallback as HFCallback

    weights = []
    for i, callbacks in enumerate(([], [HFCallback(logdir=None)])):
        model = _gpt2()
        _hf_train(model, tmp_path / f"out{i}", callbacks)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not list(tmp_path.rglob("events.out.tfevents.*"))  # logdir=None: no TensorBoard


@pytest.mark.parametrize("zero", [True, False])
def test_hf_only_world_process_zero_warns_and_writes(tmp_path, zero, hf_offline):
    from torchdiag.integrations.transformers import TorchDiagCallback as HFCallback

    torch.manual_seed(0)
    model = deep_relu(std=0.01)
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), logging_dir=str(tmp_path / "logs"))
    state = SimpleNamespace(is_world_process_zero=zero)
    callback = HFCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_begin(args, state, None, model=model)
        for _ in range(2):
            model(torch.randn(16, 16)).sum().backward()
            callback.on_step_end(args, state, None, model=model)
        callback.on_train_end(args, state, None, model=model)
    ours = [w for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert callback.watcher.step_count == 2 and callback.report().flagged
    if zero:
        assert ours and events and (tmp_path / "logs" / "torchdiag").is_dir()
        assert [e.step for e in event_scalars(str(tmp_path / "logs" / "torchdiag"))["log10_act_std/0"]] == [0, 1]
    else:
        assert not ours and not events
    assert_unwatched(model)


def test_hf_callback_rejects_bad_arguments_and_can_be_closed(tmp_path, hf_offline):
    from torchdiag.integrations.transformers import TorchDiagCallback as HFCallback

    with pytest.raises(TypeError, match="evry"):
        HFCallback(evry=3)
    with pytest.raises(TypeError, match="not both"):
        HFCallback(logdir=str(tmp_path), writer=SimpleNamespace(add_scalar=print))
    # a train() that raised calls no callback: close() removes the hooks, and is idempotent
    model = deep_relu()
    callback = HFCallback(logdir=None)
    callback.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True),
                            None, model=model)
    with pytest.raises(torchdiag.TorchDiagError):
        torchdiag.watch(model)
    callback.close()
    callback.close()
    assert_unwatched(model)
