"""The training run: the loop, read top to bottom. Its parts are built in `__init__` (build.py),
its state is saved and loaded by one checkpoint manager (checkpoint/manager.py).

Launched the same way by every launcher (see launchers/train.py and training/main.py):
    deepspeed --num_gpus N launchers/train.py --config configs/x.yaml [key=value ...]
    accelerate launch --config_file launchers/accelerate/zero2.yaml launchers/train.py --config ...
    torchrun --nproc_per_node N launchers/train.py --config ...
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import yaml

from alignvl_scale.checkpoint.manager import CheckpointManager, prepare_resume
from alignvl_scale.checkpoint.rundir import (
    CHECKPOINTS,
    CONFIG,
    PROFILE,
    RELIABILITY,
    SUMMARY,
    TENSORBOARD,
    release_run_dir,
)
from alignvl_scale.checkpoint.store import demote_checkpoint
from alignvl_scale.config import contrastive_batch, describe_batch, model_fingerprint
from alignvl_scale.data.reader import TrainStream
from alignvl_scale.data.samples import SKIP_REASONS
from alignvl_scale.evaluation.evaluate import Encoder, Evaluator
from alignvl_scale.evaluation.metrics import headline
from alignvl_scale.model.towers import set_train_mode
from alignvl_scale.runtime import compat
from alignvl_scale.runtime.distributed import all_reduce_floats
from alignvl_scale.runtime.log import progress as log_progress
from alignvl_scale.runtime.log import say
from alignvl_scale.runtime.perf import MetricsWindow, StepProfiler, counted_flops, peak_memory_gib, peak_tflops
from alignvl_scale.training.batches import AgreedBatches, global_keys
from alignvl_scale.training.build import (
    build_run_model,
    make_decoder,
    make_optimizer,
    start_accelerator,
    start_logging,
)
from alignvl_scale.training.engine import deepspeed_skips_nonfinite_steps, fill_ds_config, zero_stage
from alignvl_scale.training.logger import config_value
from alignvl_scale.training.preflight import Prepared
from alignvl_scale.training.schedule import due, learning_rate
from alignvl_scale.training.signals import StopRequested
from alignvl_scale.training.state import Progress, RandomState
from alignvl_scale.training.step import ForwardBackward


class Trainer:
    """`run()` trains, `close()` ends the process group."""

    def __init__(self, prepared: Prepared) -> None:
        cfg, plan = prepared.cfg, prepared.resume  # completed by preflight, before any process group
        self.cfg, self.world, self.run_dir = cfg, prepared.launch.world, Path(cfg.run_dir)
        self.stop = StopRequested(cfg.train.stop_signals)
        self.ds_config = fill_ds_config(cfg, self.world, load_universal=bool(plan and plan.universal))
        self.accelerator, self.device = start_accelerator(cfg, self.ds_config)
        self.rank = self.device.rank
        if plan is not None:  # its universal conversion now, before the model: it holds a whole checkpoint
            prepare_resume(plan, self.rank, prepared.trust_checkpoint)
        model, preprocessing = build_run_model(cfg, self.ds_config, self.rank)
        self.stream = TrainStream(cfg.data, make_decoder(cfg, preprocessing), self.rank, self.world, cfg.seed,
                                  self.stop.names, prepared.sources)
        self.base_optimizer = make_optimizer(model, cfg)
        self.engine, self.optimizer = self.accelerator.prepare(model, self.base_optimizer)
        compat.zero_norm_without_fp64_copies(self.engine.optimizer)
        self.model = self.engine.module
        # A non-finite step is skipped by DeepSpeed after backward where it checks the gradient
        # norm anyway; elsewhere the loss is read on the host before backward (docs/training.md).
        self.loss_checked_on_host = not deepspeed_skips_nonfinite_steps(self.ds_config)
        self.forward_backward = ForwardBackward(self.engine, cfg.loss, self.device.device, self.device.dtype,
                                                self.loss_checked_on_host)
        self.logger = start_logging(cfg, self.accelerator, self.rank)
        self.profiler = StepProfiler(self.run_dir / PROFILE, cfg.train.profile_start, cfg.train.profile_steps,
                                     self.rank, self.device.device)
        self.evaluator = Evaluator(Encoder(self.model, preprocessing, self.device.device, self.device.dtype), cfg.eval)
        steps_per_epoch = (self.stream.batches_per_epoch or 0) // cfg.train.accumulation  # None: resampled
        self.progress = Progress(cfg.train.steps or cfg.train.epochs * steps_per_epoch,
                                 contrastive_batch(cfg, self.world), [cfg.train.steps, cfg.train.epochs])
        self.config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self.checkpoints = CheckpointManager(
            self.run_dir, self.engine, self.base_optimizer,
            {"progress": self.progress, "data": self.stream, "logger": self.logger,
             "random": RandomState(cfg.seed, self.rank, self.model.head.random_modules())},
            self.rank, self.world, zero_stage(self.ds_config), cfg.checkpoint.keep, self.config_yaml,
            model_fingerprint(cfg), prepared.trust_checkpoint, meta={"data_streams": cfg.data.streams})
        self.flops_per_step: int | None = None  # counted on this process's first step (perf.py)
        self.peak_tflops = peak_tflops(self.device.device, cfg.train.peak_tflops)
        # How the run starts: from the checkpoint --resume named (the plan), else from step 0.
        if plan is not None:
            notes = self.checkpoints.load(plan)
            say(f"resumed from {plan.path} at step {self.progress.step} ({'; '.join(notes)})")

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to train.steps (or train.epochs), then save, evaluate and summarize; or stop
        early on a stop signal with a checkpoint."""
        cfg, progress = self.cfg, self.progress
        if self.rank == 0:
            (self.run_dir / CONFIG).write_text(self.config_yaml)
        if progress.step == 0:
            self.logger.text("config", "```\n" + self.config_yaml + "\n```")
        say(f"{describe_batch(cfg, self.world)}; {progress.total_steps} steps; ZeRO stage {zero_stage(self.ds_config)}")
        if (deal := self.stream.deal()) is not None:
            say(deal.describe())
        if cfg.eval.at_start and progress.step == 0:
            self.evaluate()
        set_train_mode(self.model, True)
        bar = log_progress(progress.total_steps, "train", "step", initial=progress.step)
        self.batches = AgreedBatches(self.stream, self.stop, cfg.train.accumulation, self.device.device)
        try:
            stop, last = self.train_loop(bar)
        finally:  # whatever ended the loop
            self.batches.close()
        bar.close()
        return self.stopped(stop) if stop else self.finish(last)

    def train_loop(self, bar) -> tuple[str | None, dict]:
        """Steps until the budget is spent or a stop signal is agreed: (that signal or None,
        the last logged scalars). A step's periodic jobs in order: log, evaluate, save (so that
        a checkpoint holds everything logged up to its step)."""
        cfg, progress = self.cfg, self.progress
        window, last = MetricsWindow(), {}
        while progress.step < progress.total_steps:
            with window.waiting_for_data():
                micro = self.batches.next_step()
            if micro is None:  # end of epoch, agreed by all ranks
                micro = self.batches.next_epoch()
                if micro is None:
                    continue
            if isinstance(micro, str):  # a stop signal, agreed by all ranks
                return micro, last
            scalars = self.train_step(micro)
            if scalars is None:
                continue
            progress.step += 1
            if cfg.log.sample_keys:
                self.logger.sample_keys(progress.step, global_keys(micro))
            window.steps += 1
            bar.update(1)
            self.profiler.step(progress.step)
            if due(progress.step, cfg.train.log_every, progress.total_steps) or progress.step == progress.total_steps:
                last = self.log_step(scalars, window)
                bar.set_postfix(loss=f"{last['train/loss']:.4f}")
            if due(progress.step, cfg.eval.every, progress.total_steps):
                self.evaluate()
            if due(progress.step, cfg.checkpoint.every, progress.total_steps):
                self.save()
        return None, last

    # -- one step --------------------------------------------------------------------------
    def train_step(self, micro: list[dict]) -> dict | None:
        """One optimizer step over train.accumulation micro-batches; returns the step's
        scalars as tensors (read only when logged, so that no step waits on a device-to-host
        copy), or None for a skipped step."""
        factor = learning_rate(self.cfg.train, self.progress.step, self.progress.total_steps) / self.cfg.train.lr
        for group in self.base_optimizer.param_groups:  # each part at its peak rate times the schedule
            group["lr"] = group["base_lr"] * factor
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
            self.skip_step()
            return None
        self.progress.bad_steps_in_a_row = 0
        # The rates the step used, read back from the optimizer DeepSpeed stepped (not recomputed):
        # train/lr the head's, train/lr_<tower> a tower's where it has its own.
        rates = {f"train/lr_{g['part']}" if g["part"] != "head" else "train/lr": g["lr"]
                 for g in self.optimizer.param_groups}  # a part's groups share its rate
        return {"train/loss": out.loss.detach(), "train/i2t_accuracy": out.i2t_accuracy,
                "train/t2i_accuracy": out.t2i_accuracy, **rates,
                **{f"train/{name}": value.detach().reshape(()) for name, value in head.scalars().items()}}

    def skip_step(self) -> None:
        """A non-finite step, skipped on every rank; train.max_bad_steps of them in a row stop
        the run (the checkpoint saved right before them moved aside)."""
        progress = self.progress
        progress.bad_steps_in_a_row += 1
        progress.skipped_steps += 1
        if progress.bad_steps_in_a_row >= self.cfg.train.max_bad_steps:
            demoted = demote_checkpoint(self.run_dir, progress.step) if self.rank == 0 else ""
            raise FloatingPointError(f"{progress.bad_steps_in_a_row} non-finite steps in a row (loss or gradients) at "
                                     f"step {progress.step} (train.max_bad_steps); lower train.lr or check the data. "
                                     f"{demoted}")
        say(f"step {progress.step}: non-finite loss or gradients, step skipped ({progress.skipped_steps} so far)")

    # -- periodic jobs ---------------------------------------------------------------------
    def log_step(self, scalars: dict, window: MetricsWindow) -> dict:
        """The step's scalars read to the host, with throughput, memory and data counts."""
        samples = self.cfg.data.batch_size * self.cfg.train.accumulation * self.world
        grad_norm = self.engine.get_global_grad_norm()
        counts = self.stream.run_counts()
        last = {**{k: float(v) for k, v in scalars.items()},
                **window.close(samples, self.world, self.flops_per_step, self.peak_tflops),
                "perf/peak_memory_gib": all_reduce_floats([peak_memory_gib(self.device.device)], "max")[0],
                **({"train/grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                "train/contrastive_batch": self.progress.contrastive_batch,
                "train/skipped_steps": self.progress.skipped_steps, "train/epoch": self.stream.state.epoch,
                "data/good_samples": counts.good, "data/unsafe_members": counts.unsafe_members,
                "data/noisy_captions": counts.noisy_captions,
                **{f"data/skipped_{r}": counts.skipped.get(r, 0) for r in SKIP_REASONS}}
        self.logger.scalars(self.progress.step, last)
        return last

    def evaluate(self, diagrams: bool = False) -> dict[str, float]:
        """diagrams: rank 0 writes a reliability diagram per retrieval set to RUN_DIR/reliability."""
        if not self.evaluator.enabled:
            return {}
        write = diagrams and self.rank == 0
        flat = self.evaluator((self.run_dir / RELIABILITY, f"step {self.progress.step}") if write else None)
        self.logger.scalars(self.progress.step, flat)
        shown = {k.removeprefix("eval/").removeprefix("zeroshot/"): v for k, v in flat.items()
                 if headline(k, calibration=False)}
        say(f"step {self.progress.step}: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
        return flat

    def save(self) -> Path:
        path = self.checkpoints.save(self.progress.step)
        say(f"step {self.progress.step}: checkpoint {path}")
        return path

    # -- the end ---------------------------------------------------------------------------
    def finish(self, last: dict) -> dict:
        """The end of a run: a checkpoint, the final evaluation, the summary."""
        self.save()
        final = self.evaluate(diagrams=True)
        counts = self.stream.run_counts()
        summary = {"step": self.progress.step, "skipped_steps": self.progress.skipped_steps, "last": last,
                   "eval": final, "eval_images": self.evaluator.images(), "data": counts.as_dict()}
        self.logger.hparams({**{key: config_value(self.cfg, key) for key in self.cfg.log.hparams},
                             "contrastive_batch": self.progress.contrastive_batch},
                            {f"hparams/{k}": v for k, v in final.items()})
        if self.rank == 0:
            (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
        self.logger.close()
        say(f"done at step {self.progress.step}: {counts.good} good samples, skipped {dict(counts.skipped)}; "
            f"{self.run_dir / SUMMARY}, checkpoints in {self.run_dir / CHECKPOINTS}, TensorBoard: "
            f"tensorboard --logdir {self.run_dir / TENSORBOARD}")
        return summary

    def stopped(self, why: str) -> dict:
        """Preempted: a checkpoint of the last whole step (unless the periodic one just saved
        it), then a clean exit (0)."""
        path = self.checkpoints.saved if self.checkpoints.saved_step == self.progress.step else self.save()
        self.logger.close()
        say(f"stopped by {why} at step {self.progress.step}: checkpoint {path}; continue with --resume latest")
        return {"step": self.progress.step, "stopped": why, "checkpoint": str(path)}

    def close(self, end_process_group: bool = True) -> None:
        """A clean end for every rank (an abandoned process group can abort the interpreter at
        exit). With end_process_group=False the group stays for the next run in this process
        (`ablate` runs many in one; DeepSpeed caches groups made from it, so it must not be
        replaced), and Accelerate's process-wide state, which refuses a second Accelerator
        with another DeepSpeed plugin, is cleared."""
        self.stop.restore()
        self.accelerator.wait_for_everyone()
        if end_process_group:
            dist.destroy_process_group()
        release_run_dir(self.run_dir)
        compat.reset_accelerate_state()
