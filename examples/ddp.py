"""DistributedDataParallel on CPU (gloo) with torchdiag on: global statistics, rank 0 writes.

Every rank trains on its own shard of a generated classification set (DistributedSampler) and
records its own layers; at each recorded step torchdiag reduces the per-layer statistics across
the ranks (one all_reduce of SUM and one of MAX), so every rank holds the same report, that of the
global batch. Rank 0 alone prints warnings and writes TensorBoard logs, into one logdir.

    torchrun --nproc_per_node 2 examples/ddp.py [--logdir runs/ddp] [--steps 30]
    tensorboard --logdir runs/ddp

It asserts its claims: every rank ends with the same report, layer names carry no DDP
``module.`` prefix, and the loss falls.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchdiag

FEATURES, CLASSES, SAMPLES = 32, 10, 4096


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=gen)
    y = (x @ torch.randn(FEATURES, CLASSES, generator=gen)).argmax(dim=1)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default="runs/ddp")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        torch.manual_seed(0)  # the same init on every rank (DDP also broadcasts rank 0's)
        model = nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                              nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, CLASSES))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
        data = dataset()
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(data, batch_size=64, sampler=sampler)

        losses = []
        # every rank watches; only rank 0 creates args.logdir, writes it and warns
        with torchdiag.watch(ddp, logdir=args.logdir, optimizer=opt, every=5) as diag:
            step, epoch = 0, 0
            while step < args.steps:
                sampler.set_epoch(epoch)
                for x, y in loader:
                    loss = F.cross_entropy(ddp(x), y)
                    loss.backward()
                    opt.step()  # with optimizer=, a torchdiag step ends here, on every rank alike
                    opt.zero_grad()
                    losses.append(loss.item())
                    step += 1
                    if step == args.steps:
                        break
                epoch += 1
        report = diag.report()

        everyone: list = [None] * world
        dist.all_gather_object(everyone, report.to_dict())
        assert all(r == everyone[0] for r in everyone), "ranks hold different reports"
        assert [layer.name for layer in report.layers] == ["0", "1", "2", "3", "4", "5", "6"], report.layers
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < first, (first, last)
        if rank == 0:
            print(report)
            print(f"\n{world} ranks, {args.steps} steps of 64 samples each; loss {first:.3f} -> {last:.3f};"
                  f" every rank holds this report (global batch of {world * 64}); TensorBoard logs in {args.logdir}")
        dist.barrier()  # leave together: no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
