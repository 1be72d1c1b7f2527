"""The Align-VL contrastive objective: symmetric InfoNCE with Embedding Smoothing over the
global batch, embeddings gathered from every rank with gradient.

Notation (docs/design.md): N pairs in the global batch, B = N / world on each rank, s_ij the
scaled cosine similarity of image i and text j, alpha the smoothing. Per row

    l_i = -sum_j q_ij log softmax_j(s_i.),   q_ij = (1 - alpha) [i == j] + alpha / N
        = LSE_j(s_i.) - (1 - alpha) s_ii - alpha mean_j(s_ij)

so the smoothed target needs no N x N matrix, and mean_j s_ij = scale * u_i . mean_j v_j is
one matrix-vector product. Only the log-sum-exp touches all N columns; the chunked path
walks them in tiles with an online LSE and recomputes the tiles in backward.

Gradient convention (the one DDP and DeepSpeed expect): every rank computes its own B rows
against all N columns in both directions; its loss has the *global* value, but carries the
gradient of its local share L_r (with mean_r L_r = L). The autograd all-gather sums the
column gradients of every rank back onto their owners, so after the engine averages
parameter gradients over ranks they equal the single-process gradients of L on the
concatenated batch. Seen from rank r alone, d loss / d (its embeddings) = world * dL/d(rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from alignvl_scale.distributed import rank_world


@dataclass
class LossOutput:
    loss: Tensor  # global loss value, local-share gradient (see module docstring)
    i2t_accuracy: Tensor  # in-batch top-1 over the global batch, no grad
    t2i_accuracy: Tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """Rows of every rank in rank order; backward returns to each rank the sum over ranks
    of the gradient of its own rows (every rank's loss depends on every rank's rows).

    Written here rather than taken from torch.distributed.nn (deprecated since torch 2.13,
    and easy to import wrongly: open_clip#980). The backward is one all_reduce, which every
    backend (gloo, nccl, ccl) implements; the gathered gradients are only N x d.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = rank_world()
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows[0]:ctx.rows[1]]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's rows in rank order; gradients flow back to their owners.

    Local batch sizes must agree across ranks: a mismatch is detected on every rank (so
    every rank raises, none hangs at a later collective).
    """
    rank, world = rank_world()
    if world == 1:
        return x
    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    all_sizes = [int(s) for s in all_sizes]
    if len(set(all_sizes)) != 1:
        raise ValueError(f"local batch sizes differ across ranks: {all_sizes}; every rank must feed "
                         "the same micro batch (use equal-length data streams)")
    return _AllGatherWithGrad.apply(x)


class _ChunkedLogSumExp(torch.autograd.Function):
    """lse_i = log sum_j exp(scale * q_i . k_j) and argmax_j, over column tiles of k.

    Never holds more than a B x chunk tile; backward recomputes each tile from the saved
    inputs and lse, so memory is O(B * chunk + N * d) in both passes.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        rows = q.shape[0]
        lse = torch.full((rows,), float("-inf"), device=q.device, dtype=q.dtype)
        best = torch.full((rows,), float("-inf"), device=q.device, dtype=q.dtype)
        best_idx = torch.zeros(rows, device=q.device, dtype=torch.long)
        for start in range(0, k.shape[0], chunk):
            tile = scale * (q @ k[start:start + chunk].T)
            lse = torch.logaddexp(lse, torch.logsumexp(tile, dim=1))
            tile_best, tile_idx = tile.max(dim=1)
            better = tile_best > best  # strict: the first maximum wins, as in argmax
            best = torch.where(better, tile_best, best)
            best_idx = torch.where(better, tile_idx + start, best_idx)
        ctx.save_for_backward(q, k, scale, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(best_idx)
        return lse, best_idx

    @staticmethod
    def backward(ctx, grad_lse: Tensor, _grad_idx: Tensor):
        q, k, scale, lse = ctx.saved_tensors
        grad_q = torch.zeros_like(q)
        grad_k = torch.empty_like(k)
        grad_scale = torch.zeros((), device=q.device, dtype=q.dtype)
        for start in range(0, k.shape[0], ctx.chunk):
            k_tile = k[start:start + ctx.chunk]
            raw = q @ k_tile.T
            # d lse_i / d s_ij = softmax_j(s_i.)_j; chain through s_ij = scale * raw_ij
            grad_s = torch.exp(scale * raw - lse[:, None]) * grad_lse[:, None]
            grad_q += scale * (grad_s @ k_tile)
            grad_k[start:start + ctx.chunk] = scale * (grad_s.T @ q)
            grad_scale += (grad_s * raw).sum()
        return grad_q, grad_k, grad_scale.reshape(scale.shape), None


def _direction_loss(q: Tensor, k: Tensor, scale: Tensor, offset: int, smoothing: float,
                    chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Mean smoothed cross entropy of the local rows q (B x d) against all columns k (N x d).

    Returns (loss, number of rows whose top-1 column is their own pair).
    """
    rows = q.shape[0]
    labels = torch.arange(rows, device=q.device) + offset
    if chunk_size is None:
        logits = scale * (q @ k.T)
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        correct = (logits.detach().argmax(dim=1) == labels).sum()
        return loss, correct
    lse, top1 = _ChunkedLogSumExp.apply(q, k, scale, chunk_size)
    positive = scale * (q * k[offset:offset + rows]).sum(dim=1)
    column_mean = scale * (q @ k.mean(dim=0))
    loss = (lse - (1.0 - smoothing) * positive - smoothing * column_mean).mean()
    return loss, (top1 == labels).sum()


def _validate(image_emb: Tensor, text_emb: Tensor, smoothing: float, chunk_size: int | None) -> None:
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError("image_emb and text_emb must both be (local_batch, dim) with equal shapes, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")


def align_vl_loss_with_stats(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor,
                             smoothing: float = 0.0, chunk_size: int | None = None) -> LossOutput:
    """The loss plus in-batch top-1 accuracies, see `align_vl_loss`."""
    _validate(image_emb, text_emb, smoothing, chunk_size)
    rank, world = rank_world()
    # fp32 math whatever the towers run in: bf16 logits lose the ranking at large N.
    u, v = image_emb.float(), text_emb.float()
    scale = logit_scale.float().reshape(())
    all_u, all_v = gather_with_grad(u), gather_with_grad(v)
    # Checked on the gathered tensors so that every rank agrees and raises together.
    if not (torch.isfinite(all_u).all() and torch.isfinite(all_v).all() and torch.isfinite(scale)):
        raise FloatingPointError("non-finite embeddings or logit_scale in the contrastive batch")
    offset = u.shape[0] * rank
    loss_i2t, correct_i2t = _direction_loss(u, all_v, scale, offset, smoothing, chunk_size)
    loss_t2i, correct_t2i = _direction_loss(v, all_u, scale, offset, smoothing, chunk_size)
    local = (loss_i2t + loss_t2i) / 2
    stats = torch.stack([local.detach(), correct_i2t.float(), correct_t2i.float()])
    if world > 1:
        dist.all_reduce(stats)
    n = all_u.shape[0]
    # Global value, local-share gradient.
    loss = local + (stats[0] / world - local).detach()
    return LossOutput(loss=loss, i2t_accuracy=stats[1] / n, t2i_accuracy=stats[2] / n)


def align_vl_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, smoothing: float = 0.0,
                  chunk_size: int | None = None) -> Tensor:
    """Symmetric InfoNCE with Embedding Smoothing over the global (all-rank) batch.

    Args:
        image_emb, text_emb: this rank's (B, d) rows, L2-normalized by the caller; row i of
            each is a pair. With a process group initialized, all ranks' rows are gathered
            (equal B required) into the N = B * world global batch.
        logit_scale: the temperature multiplier exp(t), already clamped. The clamp lives in
            `alignvl_scale.model.Temperature.forward`, not here and not in place after the
            step (under ZeRO the optimizer updates fp32 master copies).
        smoothing: alpha in [0, 1); targets (1 - alpha) [i == j] + alpha / N. 0 is CLIP.
        chunk_size: None for the plain B x N logits; an int to stream the columns in tiles
            of that many with recomputation in backward (same value and gradients).

    Returns the global loss on every rank, with the local-share gradient described in the
    module docstring (average parameter gradients over ranks to get the global gradient).
    """
    return align_vl_loss_with_stats(image_emb, text_emb, logit_scale, smoothing, chunk_size).loss
