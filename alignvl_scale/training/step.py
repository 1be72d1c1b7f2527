"""One optimizer step's forward and backward through the DeepSpeed engine: one micro-batch
directly, several as one contrastive batch (GradCache, training/accumulate.py)."""

from __future__ import annotations

import torch

from alignvl_scale.config import LossConfig
from alignvl_scale.losses.registry import HeadOutput
from alignvl_scale.training.accumulate import accumulated_backward


class ForwardBackward:
    def __init__(self, engine, loss_cfg: LossConfig, device: torch.device, dtype: torch.dtype,
                 loss_checked_on_host: bool) -> None:
        """dtype: what the towers run in; loss_checked_on_host: FloatingPointError on every rank
        alike when the loss is not finite (where DeepSpeed does not check the gradient norm
        itself: docs/training.md)."""
        self.engine, self.model, self.loss_cfg = engine, engine.module, loss_cfg
        self.device, self.dtype, self.loss_checked_on_host = device, dtype, loss_checked_on_host

    def __call__(self, micro: list[dict]):
        """Loss and gradients of one step (its optimizer step included): (loss output, head output)."""
        if len(micro) == 1:
            head = self.engine(micro[0])
            out = self.loss(head)
            self.backward(out.loss)
            return out, head
        return accumulated_backward(self.accumulation_inputs(micro), self.engine, self.loss, self.backward,
                                    self.model.head.random_modules())

    def loss(self, out: HeadOutput):
        """The run's objective (looked up once, held by the head) over the contrastive batch."""
        return self.model.head.objective.loss(out, self.loss_cfg, check_finite=self.loss_checked_on_host)

    def backward(self, loss) -> None:
        """Gradients accumulate in the engine until its step at the end of the cycle; no 1/K
        scaling (the contrastive loss is already the whole batch's)."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # an optimizer step only at the end of an accumulation cycle

    def accumulation_inputs(self, micro: list[dict]) -> list[dict]:
        """What the accumulation forwards (twice) through the engine. With no trainable tower
        (frozen towers, or cached features) the towers run once, here, and the engine gets
        their outputs, so only the head runs in both passes: the fast path."""
        if any(getattr(t, "trainable", False) for t in (self.model.image_tower, self.model.text_tower)):
            return micro
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return [{**dict(zip(("image_features", "text_features"), self.model.tower_features(b), strict=True)),
                     "rows": b.get("rows")} for b in micro]
