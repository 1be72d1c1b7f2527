"""The training objectives, by name (`loss.objective`), and what the head hands them.

An objective is a loss function of the head's output plus what the rest of the trainer
needs to know about it: the initial temperature and bias (None: the head has no bias), and
how evaluation reads a model's confidence (`metrics.retrieval_metrics`'s calibration). A
new objective is one function and one entry in OBJECTIVES; the head, GradCache, the
trainer, evaluation and export take everything from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

from torch import Tensor

from alignvl_scale.loss import LossOutput, align_vl_loss_with_stats
from alignvl_scale.perf import exact_fp32_matmuls
from alignvl_scale.sigmoid_loss import sigmoid_loss_with_stats

if TYPE_CHECKING:
    from alignvl_scale.config import LossConfig


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
class Objective:
    loss: Callable[[HeadOutput, LossConfig, bool], LossOutput]  # (out, cfg, check_finite)
    logit_scale_init: float
    logit_bias_init: float | None  # None: no bias parameter
    calibration: Literal["softmax", "sigmoid"]  # how retrieval_metrics reads confidence
    description: str  # one line for the model card


def infonce(out: HeadOutput, cfg: LossConfig, check_finite: bool) -> LossOutput:
    return align_vl_loss_with_stats(out.image, out.text, out.logit_scale, cfg.smoothing, cfg.chunk_size,
                                    cfg.matmul_precision, check_finite)


def siglip(out: HeadOutput, cfg: LossConfig, check_finite: bool) -> LossOutput:
    return sigmoid_loss_with_stats(out.image, out.text, out.logit_scale, out.logit_bias, cfg.smoothing,
                                   cfg.chunk_size, cfg.matmul_precision, check_finite)


OBJECTIVES: dict[str, Objective] = {
    "infonce": Objective(infonce, 1 / 0.07, None, "softmax",
                         "symmetric InfoNCE over the global batch with Embedding Smoothing"),
    # open_clip's SigLIP defaults (the SigLIP paper): scale 10, bias -10.
    "siglip": Objective(siglip, 10.0, -10.0, "sigmoid",
                        "the sigmoid (SigLIP) loss over the global batch with Embedding Smoothing on its binary "
                        "targets"),
}


def objective_loss(out: HeadOutput, cfg: LossConfig, check_finite: bool = True) -> LossOutput:
    """The configured objective's loss on a head output; its forward in full fp32 on CUDA
    whatever train.tf32 says (the fused path's tiles: loss.matmul_precision). check_finite:
    FloatingPointError on every rank when the global loss is not finite (a host read)."""
    with exact_fp32_matmuls(out.image.device):
        return OBJECTIVES[cfg.objective].loss(out, cfg, check_finite)
