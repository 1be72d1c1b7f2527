"""The baseline of train_bench.py: the same model, data, loss and optimizer as the trainer,
in a plain PyTorch DDP loop (no DeepSpeed, no Accelerate). Run under torchrun; prints one
JSON line with samples/s per logging window on rank 0.

    torchrun --nproc_per_node 2 benchmarks/ddp_baseline.py --config RUN.yaml [key=value ...]
"""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from alignvl_scale.config import load_config
from alignvl_scale.data.reader import TrainStream
from alignvl_scale.losses.registry import objective
from alignvl_scale.model.finetune import param_groups
from alignvl_scale.model.head import build_model, build_preprocessing
from alignvl_scale.model.towers import set_train_mode
from alignvl_scale.runtime.seeding import seed_everything
from alignvl_scale.training.arguments import parse_args
from alignvl_scale.training.build import make_decoder


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.overrides)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(cfg.seed)
    model = build_model(cfg, rank)
    stream = TrainStream(cfg.data, make_decoder(cfg, build_preprocessing(cfg)), rank, world, cfg.seed)
    ddp = DistributedDataParallel(model, static_graph=True)  # towers may hold unused parameters (a pooler)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr,
                                  betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    set_train_mode(model, True)
    batches, rates, step = iter(stream), [], 0
    window_start = time.perf_counter()
    while step < cfg.train.steps:
        batch = next(batches, None)
        if batch is None:
            stream.next_epoch()
            batches = iter(stream)
            continue
        loss = objective(cfg.loss.objective).loss(ddp(batch), cfg.loss).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if step % cfg.train.log_every == 0:
            rates.append(cfg.train.log_every * cfg.data.batch_size * world / (time.perf_counter() - window_start))
            window_start = time.perf_counter()
    if rank == 0:
        print(json.dumps({"samples_per_s": rates}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
