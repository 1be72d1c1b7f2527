"""The training run: config -> engine -> loop -> checkpoints, TensorBoard, eval.

Launched the same way by every launcher (see launchers/train.py):
    deepspeed --num_gpus N launchers/train.py --config configs/x.yaml [key=value ...]
    accelerate launch --config_file launchers/accelerate/zero2.yaml launchers/train.py --config ...
    torchrun --nproc_per_node N launchers/train.py --config ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from alignvl_scale.accumulate import accumulated_backward
from alignvl_scale.checkpoint import (
    CheckpointError,
    demote_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from alignvl_scale.config import ConfigError, RunConfig, load_config
from alignvl_scale.data.reader import (
    DataError,
    FeatureDecoder,
    ImageTextDecoder,
    TrainStream,
    batches_per_epoch,
    load_sources,
)
from alignvl_scale.data.samples import SKIP_REASONS
from alignvl_scale.data.shards import DataSourceError, resolve_spec
from alignvl_scale.distributed import all_reduce_floats, every_rank
from alignvl_scale.engine import fill_ds_config, free_port, make_accelerator, zero3_init, zero_stage
from alignvl_scale.evaluate import Encoder, evaluate_specs, evaluate_zero_shot
from alignvl_scale.logger import RunLogger, flat_config
from alignvl_scale.loss import align_vl_loss_with_stats
from alignvl_scale.model import AlignVLModel, Preprocessing, build_model, build_preprocessing, with_feature_manifest
from alignvl_scale.perf import StepProfiler, counted_flops, peak_memory_gib, peak_tflops, throughput_scalars
from alignvl_scale.rundir import CONFIG, PROFILE, SUMMARY, RunDirError, claim_run_dir
from alignvl_scale.towers import check_tower_source, set_train_mode, tower_warnings
from alignvl_scale.zeroshot import load_zero_shot_set, zero_shot_layout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Align-VL training", epilog="Every config key, its default and its "
                                     "meaning: alignvl-scale config show --defaults")
    parser.add_argument("--config", help="run YAML (configs/); key=value overrides follow")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run_dir that holds an earlier run (deletes its checkpoints and logs)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_rate(cfg: RunConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup over
    train.warmup_steps, then cosine from train.lr towards train.lr * train.min_lr_ratio,
    reached at step `total_steps` (transformers' cosine-with-warmup schedule).

    A pure function of the step, so a resumed run cannot drift from it, and no scheduler
    goes through `accelerator.prepare`: Accelerate's wrapper steps a prepared scheduler once
    per process per optimizer step, so the schedule would run world_size times too fast.
    """
    warmup, floor = cfg.train.warmup_steps, cfg.train.min_lr_ratio
    if step < warmup:
        return cfg.train.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.train.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and the temperature (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Parameters built under zero.Init are empty partitions; ds_shape is their real shape.
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    groups = [{"params": [p for p, m in zip(params, matrix, strict=True) if m], "weight_decay": weight_decay},
              {"params": [p for p, m in zip(params, matrix, strict=True) if not m], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_decoder(cfg: RunConfig, preprocessing: Preprocessing | None):
    if preprocessing is None:
        return FeatureDecoder(cfg.seed)
    crop = tuple(cfg.data.augment_crop_scale) if cfg.data.augment_crop_scale else None
    return ImageTextDecoder(cfg.data.limits(), preprocessing.image_transform, preprocessing.tokenize, cfg.seed, crop)


def _to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device as they are: float inputs stay fp32 (bf16 runs cast inside
    autocast, where each op picks its precision)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def single_process_env() -> None:
    """Without a launcher: the environment of a one-rank launch (DeepSpeed wants a process group)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


class Trainer:
    """Holds what one run needs; `run()` is the loop, `close()` ends the process group."""

    def __init__(self, cfg: RunConfig) -> None:
        cfg = with_feature_manifest(cfg)  # cached features: dims and towers from their manifest, saved with the run
        self.cfg = cfg
        single_process_env()
        world = int(os.environ["WORLD_SIZE"])
        self.ds_config = fill_ds_config(cfg, world)
        others = [name for name in cfg.log.report_to if name != "tensorboard"]  # TensorBoard: RunLogger's own
        self.accelerator = make_accelerator(self.ds_config, others, cfg.run_dir)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.run_dir = Path(cfg.run_dir)
        # Only parameters inside zero.Init: its tensors land on the accelerator (issue 14).
        preprocessing = None if cfg.data.kind == "features" else build_preprocessing(cfg)
        seed_everything(cfg.seed)  # the same initial weights on every rank
        with zero3_init(self.ds_config):
            model = build_model(cfg, self.rank)
        seed_everything(cfg.seed + 1_000_003 * (self.rank + 1))  # dropout: a different mask on every rank
        self.random_modules = model.head.random_modules()
        for modality, tower in (("image", model.image_tower), ("text", model.text_tower)):
            for warning in tower_warnings(tower, modality, cfg.train.lr):
                self.log(warning)
        self.stream = TrainStream(cfg.data, make_decoder(cfg, preprocessing), self.rank, self.world, cfg.seed)
        steps_per_epoch = (self.stream.batches_per_epoch or 0) // cfg.train.accumulation  # None: resampled
        self.total_steps = cfg.train.steps or cfg.train.epochs * steps_per_epoch
        # DeepSpeed steps this optimizer on its fp32 partitions; its param_groups' "lr" is
        # what every step uses, set by set_learning_rate() before each step.
        self.base_optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                                betas=tuple(cfg.train.betas), eps=cfg.train.eps)
        self.engine, self.optimizer = self.accelerator.prepare(model, self.base_optimizer)
        self.config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self.model: AlignVLModel = self.engine.module
        if others:
            self.accelerator.init_trackers(cfg.log.project or self.run_dir.name, config=flat_config(cfg.to_dict()))
        self.logger = RunLogger(self.run_dir, enabled=self.rank == 0, tensorboard="tensorboard" in cfg.log.report_to,
                                accelerator=self.accelerator if others else None)
        self.step, self.bad_steps_in_a_row, self.skipped_steps = 0, 0, 0
        self.flops_per_step: int | None = None  # counted on this process's first step (perf.py)
        self.peak_tflops = peak_tflops(self.device, cfg.train.peak_tflops)
        self.profiler = StepProfiler(self.run_dir / PROFILE, cfg.train.profile_start, cfg.train.profile_steps,
                                     self.rank, self.device)
        self.eval_cache: dict = {}  # retrieval sets by spec
        self.zero_shot_cache: dict = {}  # zero-shot sets by folder
        self.encoder = Encoder(self.model, preprocessing, self.device, self.dtype)  # features: no preprocessing

    # -- state -----------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        # No scheduler state: the learning rate is a function of the step.
        return {"data": self.stream.state_dict(), "skipped_steps": self.skipped_steps,
                "bad_steps_in_a_row": self.bad_steps_in_a_row}

    def resume(self, resume: str) -> None:
        path = resolve_resume(self.run_dir, resume)
        if path is None:
            self.log(f"--resume {resume}: no checkpoint yet in {self.run_dir}, starting fresh")
            return
        state = load_checkpoint(self.engine, path, self.random_modules)
        self.step = state["step"]
        self.stream.load_state_dict(state["data"])
        self.skipped_steps, self.bad_steps_in_a_row = state["skipped_steps"], state["bad_steps_in_a_row"]
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> None:
        path = save_checkpoint(self.engine, self.run_dir, self.step, self.trainer_state(), self.random_modules,
                               self.cfg.checkpoint.keep, self.config_yaml)
        self.log(f"step {self.step}: checkpoint {path}")

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[alignvl-scale] {message}", flush=True)

    # -- pieces of a step ------------------------------------------------------------------
    def next_micro_batches(self, batches) -> list[dict] | None:
        """The next train.accumulation batches on every rank, or None on every rank when any
        rank runs out of data (so no rank waits in a collective the others left); an
        incomplete accumulation cycle at the end of an epoch is dropped, like a partial batch."""
        micro = []
        for _ in range(self.cfg.train.accumulation):
            batch = next(batches, None)
            if not every_rank(batch is not None):
                return None
            micro.append(_to_device(batch, self.device))
        return micro

    def next_epoch(self):
        """The next epoch's batches; an epoch that gave no batch at all stops the run (it
        would spin for ever). `batches` is the same on every rank: they stop together."""
        if self.stream.state.batches == 0:
            counts = self.stream.counts
            raise DataError(f"epoch {self.stream.state.epoch} of {self.cfg.data.train} gave rank {self.rank} no batch "
                            f"of data.batch_size={self.cfg.data.batch_size}: {counts.good} good samples so far, "
                            f"skipped {dict(counts.skipped)} (see `alignvl-scale data check`)")
        self.stream.next_epoch()
        return iter(self.stream)

    def set_learning_rate(self) -> None:
        lr = learning_rate(self.cfg, self.step, self.total_steps)
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr

    def loss(self, u, v, scale):
        """The Align-VL loss over the contrastive batch. FloatingPointError when it is not
        finite (decided on the all-reduced loss, so on every rank alike)."""
        loss = self.cfg.loss
        return align_vl_loss_with_stats(u, v, scale, loss.smoothing, loss.chunk_size, loss.matmul_precision)

    def backward(self, loss) -> None:
        """Gradients accumulate in the engine until its step at the end of the cycle;
        no 1/K scaling (the contrastive loss is already the whole batch's)."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # an optimizer step only at the end of an accumulation cycle

    def accumulation_inputs(self, micro: list[dict]) -> list[dict]:
        """What the accumulation forwards (twice) through the engine. With no trainable tower
        (frozen towers, or cached features) the towers run once, here, and the engine gets
        their outputs, so only the head runs in both passes: the fast path."""
        if any(getattr(t, "trainable", False) for t in (self.model.image_tower, self.model.text_tower)):
            return micro
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return [dict(zip(("image_features", "text_features"), self.model.tower_features(b), strict=True))
                    for b in micro]

    def train_step(self, micro: list[dict]) -> dict | None:
        """One optimizer step over train.accumulation micro-batches; returns the step's
        scalars as tensors (read only when logged, so that no step waits on a device-to-host
        copy), or None for a skipped step."""
        self.set_learning_rate()
        try:
            if self.flops_per_step is None:
                (out, scale), self.flops_per_step = counted_flops(lambda: self.forward_backward(micro))
            else:
                out, scale = self.forward_backward(micro)
        except FloatingPointError:  # raised before any backward, on every rank alike
            out = None
        if out is None:
            self.bad_steps_in_a_row += 1
            self.skipped_steps += 1
            if self.bad_steps_in_a_row >= self.cfg.train.max_bad_steps:
                demoted = demote_checkpoint(self.run_dir, self.step) if self.rank == 0 else ""
                raise FloatingPointError(f"{self.bad_steps_in_a_row} non-finite losses in a row at step {self.step} "
                                         f"(train.max_bad_steps); lower train.lr or check the data. {demoted}")
            self.log(f"step {self.step}: non-finite loss, step skipped ({self.skipped_steps} so far)")
            return None
        self.bad_steps_in_a_row = 0
        # The rate the step used, read back from the optimizer DeepSpeed stepped (not recomputed).
        lr = self.optimizer.param_groups[0]["lr"]
        return {"train/loss": out.loss.detach(), "train/i2t_accuracy": out.i2t_accuracy,
                "train/t2i_accuracy": out.t2i_accuracy, "train/logit_scale": scale.detach(), "train/lr": lr}

    def forward_backward(self, micro: list[dict]):
        """Loss and gradients of one step (its optimizer step included); (loss output, scale)."""
        if len(micro) == 1:
            u, v, scale = self.engine(micro[0])
            out = self.loss(u, v, scale)
            self.backward(out.loss)
            return out, scale
        return accumulated_backward(self.accumulation_inputs(micro), self.engine, self.loss, self.backward,
                                    self.random_modules)

    def data_scalars(self) -> dict:
        counts = self.stream.counts
        totals = all_reduce_floats([counts.good, counts.unsafe_members, counts.noisy_captions]
                                   + [counts.skipped.get(r, 0) for r in SKIP_REASONS])
        out = {"data/good_samples": totals[0], "data/unsafe_members": totals[1], "data/noisy_captions": totals[2]}
        out.update({f"data/skipped_{r}": n for r, n in zip(SKIP_REASONS, totals[3:], strict=True)})
        return out

    def evaluate(self) -> dict[str, float]:
        evals = self.cfg.eval
        if not evals.data and not evals.zero_shot:
            return {}
        results = evaluate_specs(self.encoder, evals.data, evals.batch_size, self.eval_cache, evals.allow_outside_paths)
        flat = {}
        for spec, metrics in results.items():
            name = Path(spec).stem if len(results) > 1 else ""
            flat.update({f"eval/{name + '/' if name else ''}{k}": v for k, v in metrics.items()})
        for folder in evals.zero_shot:
            if folder not in self.zero_shot_cache:
                self.zero_shot_cache[folder] = load_zero_shot_set(folder)
            accuracy = evaluate_zero_shot(self.encoder, self.zero_shot_cache[folder], evals.batch_size)
            flat.update({f"eval/zeroshot/{Path(folder).name}/{k}": v for k, v in accuracy.items()})
        self.logger.scalars(self.step, flat)
        shown = {k.removeprefix("eval/").removeprefix("zeroshot/"): v for k, v in flat.items()
                 if "R@" in k or "/top" in k}
        self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
        return flat

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        if self.rank == 0:
            (self.run_dir / CONFIG).write_text(self.config_yaml)
            self.logger.text("config", "```\n" + self.config_yaml + "\n```")
        global_batch = cfg.data.batch_size * cfg.train.accumulation * self.world  # samples read per step
        fusemix = cfg.model.mixup == "fusemix"  # B samples -> B/2 mixed pairs
        contrastive_batch = global_batch // 2 if fusemix else global_batch
        accumulated = f" x {cfg.train.accumulation} accumulated" if cfg.train.accumulation > 1 else ""
        mixed = f"{global_batch} samples mixed in pairs (fusemix) = " if fusemix else ""
        self.log(f"{self.world} ranks x {cfg.data.batch_size}{accumulated} = {mixed}contrastive batch "
                 f"{contrastive_batch}; {self.total_steps} steps; "
                 f"ZeRO stage {zero_stage(self.ds_config)}")
        if cfg.eval.at_start and self.step == 0:
            self.evaluate()
        set_train_mode(self.model, True)
        progress = _progress(self.total_steps, self.step, enabled=self.rank == 0)
        batches = iter(self.stream)
        window, last = MetricsWindow(), {}
        while self.step < self.total_steps:
            with window.waiting_for_data():
                micro = self.next_micro_batches(batches)
            if micro is None:  # end of epoch, agreed by all ranks
                batches = self.next_epoch()
                continue
            scalars = self.train_step(micro)
            if scalars is None:
                continue
            self.step += 1
            window.steps += 1
            progress.update(1)
            self.profiler.step(self.step)
            if due(self.step, cfg.train.log_every, self.total_steps) or self.step == self.total_steps:
                grad_norm = self.engine.get_global_grad_norm()
                last = {**{k: float(v) for k, v in scalars.items()},
                        **window.close(global_batch, self.world, self.flops_per_step, self.peak_tflops),
                        "perf/peak_memory_gib": all_reduce_floats([peak_memory_gib(self.device)], "max")[0],
                        "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "train/contrastive_batch": contrastive_batch, "train/skipped_steps": self.skipped_steps,
                        "train/epoch": self.stream.state.epoch, **self.data_scalars()}
                self.logger.scalars(self.step, last)
                progress.set_postfix(loss=f"{last['train/loss']:.4f}")
            if due(self.step, cfg.checkpoint.every, self.total_steps):
                self.save()
            if due(self.step, cfg.eval.every, self.total_steps):
                self.evaluate()
        progress.close()
        self.save()
        final = self.evaluate()
        summary = {"step": self.step, "skipped_steps": self.skipped_steps, "last": last, "eval": final,
                   "eval_images": sum(len(s.images) for s in self.eval_cache.values()),
                   "data": self.stream.counts.as_dict()}
        self.logger.hparams({"noise_sigma": cfg.model.noise_sigma, "smoothing": cfg.loss.smoothing,
                             "mixup": cfg.model.mixup, "caption_noise": cfg.data.caption_noise,
                             "train_fraction": cfg.data.train_fraction, "seed": cfg.seed, "lr": cfg.train.lr,
                             "contrastive_batch": contrastive_batch}, {f"hparams/{k}": v for k, v in final.items()})
        if self.rank == 0:
            (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
        self.logger.close()
        return summary

    def close(self) -> None:
        """A clean end for every rank (an abandoned process group can abort the interpreter at exit)."""
        self.accelerator.wait_for_everyone()
        dist.destroy_process_group()


def due(step: int, every: int, total_steps: int) -> bool:
    """Is it time for a periodic job (log, checkpoint, eval) after `step`? Every `every`
    steps (0: never), and not at the last step, which the run ends with anyway."""
    return every > 0 and step % every == 0 and step < total_steps


class MetricsWindow:
    """Throughput and data wait since the last log line."""

    def __init__(self) -> None:
        self.start, self.data_time, self.steps = time.perf_counter(), 0.0, 0

    @contextmanager
    def waiting_for_data(self):
        start = time.perf_counter()
        yield
        self.data_time += time.perf_counter() - start

    def close(self, global_batch: int, world: int, flops_per_step: int | None = None,
              peak_tflops: float | None = None) -> dict[str, float]:
        """The window's scalars; a new window starts."""
        elapsed = time.perf_counter() - self.start
        out = {"perf/samples_per_s": self.steps * global_batch / elapsed,
               "perf/samples_per_s_per_rank": self.steps * global_batch / world / elapsed,
               "perf/data_wait_fraction": self.data_time / elapsed,
               **throughput_scalars(flops_per_step, self.steps, elapsed, peak_tflops)}
        self.__init__()
        return out


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    # In a log file (no terminal) a redraw every 30 s, not every step.
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30)


def check_inputs(cfg: RunConfig) -> None:
    """Everything a run needs that can be checked without a process group, so that a typo
    fails in a second with its key named, not after the engine starts (or after training,
    for an eval set): shards and their manifests, the batches an epoch gives each rank, eval
    sets, tower folders. (The DeepSpeed JSON is checked with the config.)"""
    sources = load_sources(cfg.data)
    if cfg.data.mode == "epoch":
        per_epoch = batches_per_epoch(sources, int(os.environ.get("WORLD_SIZE", "1")), cfg.data.workers,
                                      cfg.data.batch_size, cfg.seed, train_fraction=cfg.data.train_fraction)
        if per_epoch < cfg.train.accumulation:
            raise DataSourceError(f"train.accumulation={cfg.train.accumulation}: an epoch gives each rank only "
                                  f"{per_epoch} batches of data.batch_size={cfg.data.batch_size}")
    for spec in cfg.eval.data:
        if Path(spec).suffix.lower() == ".jsonl":
            if not Path(spec).is_file():
                raise DataSourceError(f"eval.data: {spec} is not a file")
        else:
            resolve_spec(spec)
    for folder in cfg.eval.zero_shot:
        zero_shot_layout(folder)  # folders, class and template files (its images are read at the first eval)
    if cfg.data.kind != "features":
        for modality in ("image", "text"):
            check_tower_source(getattr(cfg.model, f"{modality}_tower"), f"model.{modality}_tower")


USER_ERRORS = (ConfigError, DataSourceError, DataError, RunDirError, CheckpointError)


def main(argv: list[str] | None = None) -> dict:
    """Train. A user's mistake (bad config, data, run folder or checkpoint) ends the process
    with one line naming it, not a traceback per rank."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # validated before any process group exists
        check_inputs(cfg)
        claim_run_dir(cfg.run_dir, args.resume, args.overwrite)
        trainer = Trainer(cfg)
        if args.resume:
            trainer.resume(args.resume)
        summary = trainer.run()
    except USER_ERRORS as exc:
        print(f"[alignvl-scale] error: {exc}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)
    trainer.close()
    return summary
