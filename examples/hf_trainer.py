"""Hugging Face Trainer: torchdiag as a TrainerCallback on a small GPT-2 built from a config.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[TorchDiagCallback(logdir="runs/hf")])

A 2-layer GPT-2 (no download: built from GPT2Config, random init) trains for a few steps on generated
token sequences (a repeating pattern the model can learn). The callback starts the watch at
on_train_begin, ends a step at each on_step_end (one optimizer step; gradient accumulation's
micro-batches are merged) and writes TensorBoard events under --logdir (world process zero only).
GPT-2's N(0, 0.02) init is healthy: nothing is flagged.

    pip install "torchdiag[transformers]"
    python examples/hf_trainer.py [--logdir runs/hf_trainer] [--steps 8]
    tensorboard --logdir runs/hf_trainer
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from torchdiag.integrations.transformers import TorchDiagCallback  # noqa: E402

VOCAB, SEQ = 64, 32


class Patterns(torch.utils.data.Dataset):
    """Token sequences that repeat a random motif of length 3..6: the next token is predictable."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        rows = []
        for _ in range(n):
            period = int(torch.randint(3, 7, (1,), generator=g))
            motif = torch.randint(0, VOCAB, (period,), generator=g)
            rows.append(motif.repeat(SEQ // period + 1)[:SEQ])
        self.ids = torch.stack(rows)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/hf_trainer", help="TensorBoard log directory")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="accelerate")

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    callback = TorchDiagCallback(logdir=args.logdir)    # any torchdiag.watch() keyword: every=, config=, ...
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
                                     gradient_accumulation_steps=2, learning_rate=3e-3, report_to=[], use_cpu=True,
                                     save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=training, train_dataset=Patterns(), callbacks=[callback])
        result = trainer.train()
    report = callback.report()
    print(report, "\n")
    print(f"   {trainer.state.global_step} optimizer steps (2 micro-batches each), {callback.watcher.step_count}"
          f" torchdiag steps; {report.layers[0].calls} recorded forward calls per layer in the last step;"
          f" training loss {result.training_loss:.3f}")
    assert callback.watcher.step_count == trainer.state.global_step == args.steps
    assert all(layer.calls == 2 for layer in report.layers), "one step = one optimizer step = 2 micro-batches"
    assert report.flagged == [], "GPT-2's N(0, 0.02) init must be silent"
    events = [f for _, _, files in os.walk(args.logdir) for f in files if f.startswith("events.out.tfevents")]
    assert events, f"no TensorBoard events under {args.logdir}"
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
