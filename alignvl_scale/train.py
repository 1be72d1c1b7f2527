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
import signal
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from alignvl_scale.accumulate import accumulated_backward
from alignvl_scale.checkpoint import (
    CheckpointError,
    ResumePlan,
    convert_to_universal,
    demote_checkpoint,
    load_checkpoint,
    save_checkpoint,
    universal_dir,
)
from alignvl_scale.config import ConfigError, RunConfig, axis_values, load_config
from alignvl_scale.data.reader import DataError, FeatureDecoder, ImageTextDecoder, TrainStream, redeal
from alignvl_scale.data.samples import SKIP_REASONS
from alignvl_scale.data.shards import DataSourceError
from alignvl_scale.distributed import (
    all_gather_objects,
    all_reduce_floats,
    barrier,
    broadcast_from_rank0,
    make_host_group,
)
from alignvl_scale.engine import (
    deepspeed_skips_nonfinite_steps,
    fill_ds_config,
    make_accelerator,
    zero3_init,
    zero3_leaf_blocks,
    zero_stage,
)
from alignvl_scale.evaluate import Encoder, evaluate_specs, evaluate_zero_shot
from alignvl_scale.finetune import param_groups
from alignvl_scale.launch import LaunchError
from alignvl_scale.logger import RunLogger, flat_config
from alignvl_scale.metrics import headline
from alignvl_scale.model import AlignVLModel, Preprocessing, build_model, build_preprocessing
from alignvl_scale.objectives import HeadOutput, objective_loss
from alignvl_scale.perf import (
    StepProfiler,
    counted_flops,
    peak_memory_gib,
    peak_tflops,
    set_cuda_math,
    throughput_scalars,
)
from alignvl_scale.preflight import Prepared, preflight
from alignvl_scale.rundir import CONFIG, PROFILE, SUMMARY, RunDirError, release_run_dir
from alignvl_scale.towers import set_train_mode, tower_warnings
from alignvl_scale.zeroshot import load_zero_shot_set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Align-VL training", epilog="Every config key, its default and its "
                                     "meaning: alignvl-scale config show --defaults")
    parser.add_argument("--config", help="run YAML (configs/); key=value overrides follow")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run_dir that holds an earlier run (deletes its checkpoints and logs)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle the --resume checkpoint in full (only for files you trust: by default anything "
                        "beyond tensors and DeepSpeed's own types is refused, since unpickling can run code)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    # Overrides before and after the options alike (`--config F a=1 --resume latest b=2`).
    return parser.parse_intermixed_args(argv)


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


def make_decoder(cfg: RunConfig, preprocessing: Preprocessing | None):
    if preprocessing is None:
        return FeatureDecoder(cfg.seed)
    crop = tuple(cfg.data.augment_crop_scale) if cfg.data.augment_crop_scale else None
    return ImageTextDecoder(cfg.data.limits(), preprocessing.image_transform, preprocessing.tokenize, cfg.seed, crop)


def _to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device as they are: float inputs stay fp32 (bf16 runs cast inside
    autocast, where each op picks its precision)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class StopRequested:
    """train.stop_signals: the first one asks every rank to stop after its step (agreed
    across ranks: the signal may reach only one), a second one exits at once."""

    def __init__(self, names: list[str]) -> None:
        self.signal: str | None = None
        self.previous = {name: signal.signal(getattr(signal, name), self._handle) for name in names}

    def restore(self) -> None:
        """The handlers from before (a process that trains in-process goes on without them)."""
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def _handle(self, signum: int, _frame) -> None:
        if self.signal is not None:  # the second: now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signal.Signals(signum).name


class Trainer:
    """Holds what one run needs; `run()` is the loop, `close()` ends the process group."""

    def __init__(self, prepared: Prepared) -> None:
        cfg, plan = prepared.cfg, prepared.resume  # completed by preflight, before any process group
        self.cfg, self.plan, self.trust_checkpoint = cfg, plan, prepared.trust_checkpoint
        self.stop = StopRequested(cfg.train.stop_signals)
        self.ds_config = fill_ds_config(cfg, prepared.launch.world, load_universal=bool(plan and plan.universal))
        others = [name for name in cfg.log.report_to if name != "tensorboard"]  # TensorBoard: RunLogger's own
        self.accelerator = make_accelerator(self.ds_config, others, cfg.run_dir, cfg.engine.collective_timeout)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        make_host_group(timedelta(seconds=cfg.engine.collective_timeout))
        self.device = self.accelerator.device
        if self.device.type == "cuda":
            set_cuda_math(cfg.train.tf32, cfg.train.cudnn_benchmark)
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        # A non-finite step is skipped by DeepSpeed after backward where it checks the gradient
        # norm anyway; elsewhere the loss is read on the host before backward (docs/training.md).
        self.loss_checked_on_host = not deepspeed_skips_nonfinite_steps(self.ds_config)
        self.run_dir = Path(cfg.run_dir)
        if plan is not None:
            self.prepare_resume(plan)  # before the model: a conversion holds a whole checkpoint in memory
        # Only parameters inside zero.Init: its tensors land on the accelerator (issue 14).
        preprocessing = None if cfg.data.kind == "features" else build_preprocessing(cfg)
        seed_everything(cfg.seed)  # the same initial weights on every rank
        with zero3_init(self.ds_config):
            model = build_model(cfg, self.rank)
        if zero_stage(self.ds_config) == 3 and cfg.engine.zero3_leaf_blocks:
            self.log(f"ZeRO-3 leaf modules: {zero3_leaf_blocks(model)} tower blocks (engine.zero3_leaf_blocks)")
        seed_everything(cfg.seed + 1_000_003 * (self.rank + 1))  # dropout: a different mask on every rank
        self.random_modules = model.head.random_modules()
        for modality, tower in (("image", model.image_tower), ("text", model.text_tower)):
            for warning in tower_warnings(tower, modality, cfg.train.lr):
                self.log(warning)
        self.stream = TrainStream(cfg.data, make_decoder(cfg, preprocessing), self.rank, self.world, cfg.seed,
                                  tuple(cfg.train.stop_signals))
        steps_per_epoch = (self.stream.batches_per_epoch or 0) // cfg.train.accumulation  # None: resampled
        self.total_steps = cfg.train.steps or cfg.train.epochs * steps_per_epoch
        # DeepSpeed steps this optimizer on its fp32 partitions; its param_groups' "lr" is
        # what every step uses, set by set_learning_rate() before each step.
        self.base_optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr,
                                                betas=tuple(cfg.train.betas), eps=cfg.train.eps, fused=True)
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
    def contrastive_batch(self) -> int:
        """Pairs in one step's loss: samples read per step (halved by fusemix mixup)."""
        samples = self.cfg.data.batch_size * self.cfg.train.accumulation * self.world
        return samples // 2 if self.cfg.model.mixup == "fusemix" else samples

    def trainer_state(self) -> dict:
        # No scheduler state: the learning rate is a function of the step (and total_steps).
        return {"data": self.stream.state_dict(), "skipped_steps": self.skipped_steps,
                "bad_steps_in_a_row": self.bad_steps_in_a_row, "total_steps": self.total_steps,
                "budget": [self.cfg.train.steps, self.cfg.train.epochs], "contrastive_batch": self.contrastive_batch()}

    def prepare_resume(self, plan: ResumePlan) -> None:
        """Every rank resumes the same checkpoint; rank 0 writes its universal conversion
        while the others wait (at most engine.collective_timeout)."""
        paths = all_gather_objects(str(plan.path))
        if len(set(paths)) > 1:
            raise CheckpointError(f"the ranks chose different checkpoints to resume ({sorted(set(paths))}); was "
                                  "`latest` moved during the launch?")
        if not plan.universal:
            return
        if self.rank == 0:
            self.log(f"{plan.path.name}: converting to a universal checkpoint for "
                     f"ZeRO-{zero_stage(self.ds_config)} on {self.world} ranks -> {universal_dir(plan.path)}")
        error = convert_to_universal(plan, self.trust_checkpoint) if self.rank == 0 else None
        barrier()
        error = broadcast_from_rank0(error)
        if error:
            raise CheckpointError(error)

    def resume(self) -> None:
        plan = self.plan
        # The optimizer's hyperparameters are the config's: DeepSpeed's ZeRO-3 universal load
        # gives every parameter group the first group's (weight decay on biases, norms, the scale).
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.base_optimizer.param_groups]
        state = load_checkpoint(self.engine, plan, self.random_modules, self.trust_checkpoint)
        for group, saved in zip(self.base_optimizer.param_groups, hyper, strict=True):
            group.update(saved)
        # ...and it gives every group the same `step` tensor, which AdamW then advances once per
        # group per step (bias correction off by the group count): one tensor each.
        for param_state in self.base_optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
        self.step = state["step"]
        self.skipped_steps, self.bad_steps_in_a_row = state["skipped_steps"], state["bad_steps_in_a_row"]
        notes = [plan.describe(self.world, zero_stage(self.ds_config))]
        if plan.universal:
            notes.append(f"loaded from {universal_dir(plan.path).name}")
        if state.get("budget") == [self.cfg.train.steps, self.cfg.train.epochs] and "total_steps" in state:
            if state["total_steps"] != self.total_steps:
                notes.append(f"the schedule keeps its {state['total_steps']} steps (this world would make "
                             f"{self.total_steps})")
            self.total_steps = state["total_steps"]
        was = state.get("contrastive_batch", self.contrastive_batch())
        if was != self.contrastive_batch():
            notes.append(f"the contrastive batch changed from {was} to {self.contrastive_batch()} (set "
                         "data.global_batch_size to keep it)")
        if plan.resized:
            dealt = redeal([s["data"] for s in state["states"]], self.stream.sources, self.cfg.seed, self.cfg.data,
                           self.world)
            self.stream.load_state_dict(dealt.streams[self.rank])
            epoch = self.stream.state.epoch
            notes.append(f"the rest of the epoch ({dealt.samples} samples) re-dealt to {self.world} ranks: "
                         f"{self.stream.epoch_batches()} batches each in epoch {epoch}, {dealt.dropped} left out"
                         if self.stream.state.tasks is not None else
                         f"{dealt.samples} samples were left in the epoch, too few for a batch on every rank: "
                         f"epoch {epoch} starts")
            self.reseed(self.step)  # RNG streams cannot carry over to other ranks: new ones, from (seed, step, rank)
        else:
            self.stream.load_state_dict(state["data"])
        self.log(f"resumed from {plan.path} at step {self.step} ({'; '.join(notes)})")

    def reseed(self, step: int) -> None:
        """Fresh RNG streams for this rank after a resize: torch, numpy, python, noise, mixup."""
        seed = self.cfg.seed + 1_000_003 * (self.rank + 1) + 7_919 * step
        seed_everything(seed)
        for offset, module in enumerate(self.random_modules.values(), start=1):
            module.load_rng_state(torch.Generator().manual_seed(seed + offset).get_state())

    def save(self) -> Path:
        path = save_checkpoint(self.engine, self.run_dir, self.step, self.trainer_state(), self.random_modules,
                               self.cfg.checkpoint.keep, self.config_yaml, zero_stage(self.ds_config))
        self.log(f"step {self.step}: checkpoint {path}")
        return path

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[alignvl-scale] {message}", flush=True)

    # -- pieces of a step ------------------------------------------------------------------
    def next_micro_batches(self, batches) -> list[dict] | str | None:
        """The next train.accumulation batches on every rank, or None on every rank when any
        rank runs out of data (so no rank waits in a collective the others left); an
        incomplete accumulation cycle at the end of an epoch is dropped, like a partial batch.
        A stop signal at any rank: its name on every rank, with the stream rewound to where
        this step began (so the checkpoint holds no batch that was not trained on). One
        host all-reduce per micro-batch carries both agreements."""
        before = self.stream.mark()
        micro = []
        for _ in range(self.cfg.train.accumulation):
            batch = next(batches, None)
            have, stop = all_reduce_floats([float(batch is not None), -float(self.stop.signal is not None)], "min")
            if stop < 0:
                self.stream.rewind(before)
                return self.stop.signal or "a stop signal to another rank"
            if not have:
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
        """Every group at its peak rate (base_lr: the head's train.lr, a tower's lr) times the schedule."""
        factor = learning_rate(self.cfg, self.step, self.total_steps) / self.cfg.train.lr
        for group in self.base_optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def loss(self, out: HeadOutput):
        """The configured objective over the contrastive batch. Where the loss is checked on
        the host, FloatingPointError when it is not finite (decided on the all-reduced loss,
        so on every rank alike)."""
        return objective_loss(out, self.cfg.loss, check_finite=self.loss_checked_on_host)

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
                (out, head), self.flops_per_step = counted_flops(lambda: self.forward_backward(micro))
            else:
                out, head = self.forward_backward(micro)
        except FloatingPointError:  # raised before any backward, on every rank alike
            out = None
        if out is not None and not self.loss_checked_on_host and not self.engine.was_step_applied():
            out = None  # DeepSpeed found the gradient norm non-finite (on every rank) and skipped the step
        if out is None:
            self.bad_steps_in_a_row += 1
            self.skipped_steps += 1
            if self.bad_steps_in_a_row >= self.cfg.train.max_bad_steps:
                demoted = demote_checkpoint(self.run_dir, self.step) if self.rank == 0 else ""
                raise FloatingPointError(f"{self.bad_steps_in_a_row} non-finite steps in a row (loss or gradients) "
                                         f"at step {self.step} (train.max_bad_steps); lower train.lr or check the "
                                         f"data. {demoted}")
            self.log(f"step {self.step}: non-finite loss or gradients, step skipped ({self.skipped_steps} so far)")
            return None
        self.bad_steps_in_a_row = 0
        # The rates the step used, read back from the optimizer DeepSpeed stepped (not recomputed):
        # train/lr the head's, train/lr_<tower> a tower's where it has its own.
        rates = {f"train/lr_{g['part']}" if g["part"] != "head" else "train/lr": g["lr"]
                 for g in self.optimizer.param_groups}  # a part's groups share its rate
        return {"train/loss": out.loss.detach(), "train/i2t_accuracy": out.i2t_accuracy,
                "train/t2i_accuracy": out.t2i_accuracy, **rates,
                **{f"train/{name}": value.detach().reshape(()) for name, value in head.scalars().items()}}

    def forward_backward(self, micro: list[dict]):
        """Loss and gradients of one step (its optimizer step included); (loss output, head
        output)."""
        if len(micro) == 1:
            head = self.engine(micro[0])
            out = self.loss(head)
            self.backward(out.loss)
            return out, head
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
                 if headline(k, calibration=False)}
        self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
        return flat

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to train.steps (or train.epochs), then save, evaluate and summarize; or stop
        early on a stop signal with a checkpoint."""
        cfg = self.cfg
        if self.rank == 0:
            (self.run_dir / CONFIG).write_text(self.config_yaml)
            self.logger.text("config", "```\n" + self.config_yaml + "\n```")
        samples = cfg.data.batch_size * cfg.train.accumulation * self.world  # read per step
        accumulated = f" x {cfg.train.accumulation} accumulated" if cfg.train.accumulation > 1 else ""
        mixed = f"{samples} samples mixed in pairs (fusemix) = " if cfg.model.mixup == "fusemix" else ""
        self.log(f"{self.world} ranks x {cfg.data.batch_size}{accumulated} = {mixed}contrastive batch "
                 f"{self.contrastive_batch()}; {self.total_steps} steps; ZeRO stage {zero_stage(self.ds_config)}")
        if cfg.eval.at_start and self.step == 0:
            self.evaluate()
        set_train_mode(self.model, True)
        progress = _progress(self.total_steps, self.step, enabled=self.rank == 0)
        self.batches = iter(self.stream)
        try:
            stop, last = self.train_loop(progress, samples)
        finally:  # whatever ended the loop, the DataLoader's workers shut down now (not at exit)
            self.batches.close()
        progress.close()
        return self.stopped(stop) if stop else self.finish(last)

    def train_loop(self, progress, samples_per_step: int) -> tuple[str | None, dict]:
        """Steps until the budget is spent or a stop signal is agreed: (that signal or None,
        the last logged scalars)."""
        cfg = self.cfg
        window, last = MetricsWindow(), {}
        while self.step < self.total_steps:
            with window.waiting_for_data():
                micro = self.next_micro_batches(self.batches)
            if micro is None:  # end of epoch, agreed by all ranks
                self.batches.close()
                self.batches = self.next_epoch()
                continue
            if isinstance(micro, str):  # a stop signal, agreed by all ranks
                return micro, last
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
                        **window.close(samples_per_step, self.world, self.flops_per_step, self.peak_tflops),
                        "perf/peak_memory_gib": all_reduce_floats([peak_memory_gib(self.device)], "max")[0],
                        **({"train/grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                        "train/contrastive_batch": self.contrastive_batch(),
                        "train/skipped_steps": self.skipped_steps, "train/epoch": self.stream.state.epoch,
                        **self.data_scalars()}
                self.logger.scalars(self.step, last)
                progress.set_postfix(loss=f"{last['train/loss']:.4f}")
            if due(self.step, cfg.checkpoint.every, self.total_steps):
                self.save()
            if due(self.step, cfg.eval.every, self.total_steps):
                self.evaluate()
        return None, last

    def finish(self, last: dict) -> dict:
        """The end of a run: a checkpoint, the final evaluation, the summary."""
        cfg = self.cfg
        self.save()
        final = self.evaluate()
        summary = {"step": self.step, "skipped_steps": self.skipped_steps, "last": last, "eval": final,
                   "eval_images": sum(len(s.images) for s in self.eval_cache.values()),
                   "data": self.stream.counts.as_dict()}
        self.logger.hparams({**axis_values(cfg), "seed": cfg.seed, "lr": cfg.train.lr,
                             "contrastive_batch": self.contrastive_batch()},
                            {f"hparams/{k}": v for k, v in final.items()})
        if self.rank == 0:
            (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
        self.logger.close()
        return summary

    def stopped(self, why: str) -> dict:
        """Preempted: a checkpoint of the last whole step, then a clean exit (0)."""
        path = self.save()
        self.logger.close()
        self.log(f"stopped by {why} at step {self.step}: checkpoint {path}; continue with --resume latest")
        return {"step": self.step, "stopped": why, "checkpoint": str(path)}

    def close(self, end_process_group: bool = True) -> None:
        """A clean end for every rank (an abandoned process group can abort the interpreter at
        exit). With end_process_group=False the group stays for the next run in this process
        (`ablate` runs many in one; DeepSpeed caches groups made from it, so it must not be
        replaced), and Accelerate's process-wide state, which refuses a second Accelerator
        with another DeepSpeed plugin, is cleared."""
        from accelerate.state import AcceleratorState, GradientState

        self.stop.restore()
        self.accelerator.wait_for_everyone()
        if end_process_group:
            dist.destroy_process_group()
        release_run_dir(self.run_dir)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


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


USER_ERRORS = (ConfigError, DataSourceError, DataError, RunDirError, CheckpointError, LaunchError)
# What a collective raises when a peer died (gloo: its connection closed) or hung (a timeout).
PEER_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
               "timeout", "Connection refused", "NCCL communicator was aborted")


def _peer_lost(exc: BaseException) -> bool:
    return isinstance(exc, dist.DistError) or any(p in str(exc) for p in PEER_ERRORS)


def main(argv: list[str] | None = None, keep_process_group: bool = False) -> dict:
    """Train. A user's mistake (bad config, data, run folder or checkpoint) ends the process
    with one line naming it, not a traceback per rank; so does a lost peer rank.
    keep_process_group: the process goes on to train another run (`Trainer.close`)."""
    args = parse_args(argv)
    trainer = None
    try:
        cfg = load_config(args.config, args.overrides)  # validated before any process group exists
        trainer = Trainer(preflight(cfg, args.resume, args.overwrite, args.trust_checkpoint))
        if trainer.plan is not None:
            trainer.resume()
        summary = trainer.run()
    except USER_ERRORS as exc:
        _exit_with(f"error: {exc}", 2)
    except RuntimeError as exc:
        if not (dist.is_initialized() and _peer_lost(exc)):
            raise
        step = trainer.step if trainer is not None and hasattr(trainer, "step") else "?"
        _exit_with(f"error: lost contact with another rank at step {step} (it died, hung past "
                   f"engine.collective_timeout, or the network failed): {str(exc).splitlines()[0][:200]}; "
                   "the run stopped. Continue with --resume latest", 3, destroy=False)
    trainer.close(end_process_group=not keep_process_group)
    return summary


def _exit_with(message: str, code: int, destroy: bool = True) -> None:
    print(f"[alignvl-scale] {message}", file=sys.stderr, flush=True)
    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
