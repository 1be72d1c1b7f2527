"""The training objectives by name (`loss.objective`), and what the head hands them.

An objective is a loss function of the head's output plus what the rest of the trainer needs
to know about it: the initial temperature and bias (None: the head has no bias), and how
evaluation reads a model's confidence (`metrics.retrieval_metrics`'s calibration). It is
looked up once, by `objective(name)`, and handed on as the object: the head, GradCache, the
trainer, evaluation and export take everything from it. A new objective is one function, one
entry in OBJECTIVES and its name in `config.Objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

from alignvl_scale.config import ConfigError, LossConfig, Objective, choices
from alignvl_scale.losses.infonce import align_vl_loss_with_stats
from alignvl_scale.losses.sigmoid import sigmoid_loss_with_stats
from alignvl_scale.losses.tiles import LossOutput, argument_problems
from alignvl_scale.runtime.perf import exact_fp32_matmuls


class HeadOutput(NamedTuple):
    """The head's forward: this rank's rows and the learned scalars. A NamedTuple, so that
    DeepSpeed's ZeRO-3 hooks see its tensors (they walk tuples, not other classes)."""

    image: Tensor  # (B, d), L2-normalized
    text: Tensor  # (B, d), L2-normalized
    logit_scale: Tensor  # exp(t), clamped (model.Temperature)
    logit_bias: Tensor | None = None  # objectives with a bias only

    def scalars(self) -> dict[str, Tensor]:
        """The learned scalars by their logged names (train/logit_scale, train/logit_bias)."""
        out = {"logit_scale": self.logit_scale}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    function: Callable[[HeadOutput, LossConfig, bool], LossOutput]  # (out, cfg, check_finite)
    logit_scale_init: float
    logit_bias_init: float | None  # None: no bias parameter
    calibration: Literal["softmax", "sigmoid"]  # how retrieval_metrics reads confidence
    description: str  # one line for the model card

    def loss(self, out: HeadOutput, cfg: LossConfig, check_finite: bool = True) -> LossOutput:
        """The loss on a head output; its forward in full fp32 on CUDA whatever train.tf32 says
        (the fused path's tiles: loss.matmul_precision). check_finite: FloatingPointError on
        every rank when the global loss is not finite (a host read)."""
        with exact_fp32_matmuls(out.image.device):
            return self.function(out, cfg, check_finite)


def _infonce(out: HeadOutput, cfg: LossConfig, check_finite: bool) -> LossOutput:
    return align_vl_loss_with_stats(out.image, out.text, out.logit_scale, cfg.smoothing, cfg.chunk_size,
                                    cfg.matmul_precision, check_finite)


def _siglip(out: HeadOutput, cfg: LossConfig, check_finite: bool) -> LossOutput:
    return sigmoid_loss_with_stats(out.image, out.text, out.logit_scale, out.logit_bias, cfg.smoothing,
                                   cfg.chunk_size, cfg.matmul_precision, check_finite)


OBJECTIVES: dict[str, ObjectiveSpec] = {spec.name: spec for spec in (
    ObjectiveSpec("infonce", _infonce, 1 / 0.07, None, "softmax",
                  "symmetric InfoNCE over the global batch with Embedding Smoothing"),
    # open_clip's SigLIP defaults (the SigLIP paper): scale 10, bias -10.
    ObjectiveSpec("siglip", _siglip, 10.0, -10.0, "sigmoid",
                  "the sigmoid (SigLIP) loss over the global batch with Embedding Smoothing on its binary targets"),
)}
assert tuple(OBJECTIVES) == choices(Objective), "config.Objective names the registered objectives"


def objective(name: str) -> ObjectiveSpec:
    return OBJECTIVES[name]


def check_loss_config(cfg: LossConfig, key: str = "loss") -> None:
    """What only the losses know (before any process group): their arguments' rules, and whether
    the objective has a bias to initialize."""
    problems = argument_problems(cfg.smoothing, cfg.chunk_size, cfg.matmul_precision, prefix=f"{key}.")
    if problems:
        raise ConfigError(problems[0])
    if cfg.logit_bias_init is not None and objective(cfg.objective).logit_bias_init is None:
        raise ConfigError(f"{key}.logit_bias_init: must be null for loss.objective {cfg.objective} (it has no bias), "
                          f"got {cfg.logit_bias_init!r}")
