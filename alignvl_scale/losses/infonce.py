"""The Align-VL contrastive objective: symmetric InfoNCE with Embedding Smoothing over the
global batch, embeddings gathered from every rank with gradient.

Notation (docs/design.md): N pairs in the global batch, B = N / world on each rank, s_ij the
scaled cosine similarity of image i and text j, alpha the smoothing. Per row

    l_i = -sum_j q_ij log softmax_j(s_i.),   q_ij = (1 - alpha) [i == j] + alpha / N
        = LSE_j(s_i.) - (1 - alpha) s_ii - alpha mean_j(s_ij)

so the smoothed target needs no N x N matrix, and mean_j s_ij = scale * u_i . mean_j v_j is
one matrix-vector product. Only the log-sum-exp touches all N columns. The plain path
builds the B x N logits of each direction (the reference); the chunked (fused) path walks
the tiles of one similarity matrix once, taking the image->text LSE along its rows and the
text->image LSE down its columns, and recomputes each tile once in backward.

Gradient convention: tiles.py's (global value, local-share gradient), in both directions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from alignvl_scale.losses.tiles import (
    GatheredTexts,
    LossOutput,
    check_equal_local_batches,
    gather_with_grad,
    global_value_local_gradient,
    positives_and_others,
    tile_matmul,
    tiled_backward,
    validate_inputs,
)
from alignvl_scale.runtime.distributed import rank_world


class _FusedTiles(torch.autograd.Function):
    """Both directions' statistics of S = scale * U_r V^T from one pass over its tiles.

    U_r is this rank's B image rows; V is every rank's text rows, gathered here while this
    rank's own columns are processed. For local image i and local text j (columns combined
    over ranks, 2N floats of all-reduce):

        row_lse_i = LSE_j s_ij,   row_mean_i = mean_j s_ij   (image -> text)
        col_lse_j = LSE_i s_ij,   col_mean_j = mean_i s_ij   (text -> image)
        diagonal_i = s_ii                                    (the positives)

    and, without gradient, how many local pairs score strictly higher than every other
    candidate in their row and in their column (a tie counts against the model, as in
    evaluation: `metrics.py`). Each B x chunk tile is computed once in
    forward and once in backward, where the whole dL/ds_ij of both directions is formed on
    it, positives included, so that the gradient matmuls see the small net gradient and not
    two large terms that cancel (at scale 100, for the same bf16 matmuls, 0.85% gradient
    error with the positives outside, 0.25% inside).
    Backward all-gathers the N column gradients, and returns each rank's V rows summed over
    ranks with one reduce per rank, issued as soon as that block is done (overlapping the
    next block). Memory: O(B x chunk + N x d).
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, chunk: int, precision: str):
        rank, world = rank_world()
        b, n = u.shape[0], u.shape[0] * world
        texts = GatheredTexts(v)
        row_lse = torch.full((b,), float("-inf"), device=u.device)
        row_sum = torch.zeros(b, device=u.device)
        row_best = torch.full((b,), float("-inf"), device=u.device)  # best other than the positive
        col = torch.empty(3, n, device=u.device)  # partial lse, sum, best non-positive of each column, local rows
        diagonal = torch.empty(b, device=u.device)
        for k, c0, cols, v_tile in texts.tiles(chunk):
            tile = scale * tile_matmul(u, v_tile.T, precision)
            row_lse = torch.logaddexp(row_lse, tile.logsumexp(dim=1))
            row_sum += tile.sum(dim=1)
            col[0, cols], col[1, cols] = tile.logsumexp(dim=0), tile.sum(dim=0)
            positives, others = positives_and_others(tile, k == rank, c0)
            if positives is not None:
                diagonal[c0:c0 + len(positives)] = positives
            row_best = torch.maximum(row_best, others.amax(dim=1))
            col[2, cols] = others.amax(dim=0)
        if world > 1:
            peak = col[[0, 2]]
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            sums = torch.stack([torch.exp(col[0] - peak[0]), col[1]])
            dist.all_reduce(sums)
            col = torch.stack([peak[0] + sums[0].log(), sums[1], peak[1]])
        own = slice(rank * b, (rank + 1) * b)
        ctx.save_for_backward(u, texts.all(), scale, row_lse, col[0])
        ctx.chunk, ctx.precision = chunk, precision
        i2t_correct = (diagonal > row_best).sum()
        t2i_correct = (diagonal > col[2, own]).sum()
        ctx.mark_non_differentiable(i2t_correct, t2i_correct)
        return row_lse, row_sum / n, col[0, own], col[1, own] / n, diagonal, i2t_correct, t2i_correct

    @staticmethod
    def backward(ctx, g_row_lse, g_row_mean, g_col_lse, g_col_mean, g_diagonal, _i2t, _t2i):
        u, v_all, scale, row_lse, col_lse = ctx.saved_tensors
        rank, world = rank_world()
        n, precision = v_all.shape[0], ctx.precision
        g_col = torch.stack([g_col_lse, g_col_mean]).contiguous()
        if world > 1:
            parts = [torch.empty_like(g_col) for _ in range(world)]
            dist.all_gather(parts, g_col)
            g_col = torch.cat(parts, dim=1)
        # d mean / d s_ij = 1 / N in both directions
        g_row_mean, g_col_mean = g_row_mean[:, None] / n, g_col[1][None, :] / n

        def tile_gradient(k: int, c0: int, cols: slice, raw: Tensor) -> Tensor:
            s = scale * raw
            grad_s = (torch.exp(s - row_lse[:, None]) * g_row_lse[:, None]
                      + torch.exp(s - col_lse[None, cols]) * g_col[0][None, cols]
                      + g_row_mean + g_col_mean[:, cols])
            if k == rank:
                grad_s[c0:c0 + raw.shape[1]].diagonal().add_(g_diagonal[c0:c0 + raw.shape[1]])
            return grad_s

        grad_u, grad_v, grad_scale, _ = tiled_backward(u, v_all, scale, ctx.chunk, precision, tile_gradient)
        return grad_u, grad_v, grad_scale.reshape(scale.shape), None, None


def _direction_loss(q: Tensor, k: Tensor, scale: Tensor, offset: int, smoothing: float) -> tuple[Tensor, Tensor]:
    """Plain path: mean smoothed cross entropy of the local rows q (B x d) against all
    columns k (N x d) on the full B x N logits. Returns (loss, rows whose pair scores
    strictly above every other column: ties count against the model, as in evaluation)."""
    rows = torch.arange(q.shape[0], device=q.device)
    logits = scale * (q @ k.T)
    loss = F.cross_entropy(logits, rows + offset, label_smoothing=smoothing)
    others = logits.detach().clone()
    others[rows, rows + offset] = float("-inf")
    return loss, (logits.detach()[rows, rows + offset] > others.amax(dim=1)).sum()


def _fused_loss(u: Tensor, v: Tensor, scale: Tensor, smoothing: float, chunk: int,
                precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked path: this rank's share of L from one fused pass over the tiles (derivation in
    the module docstring; both directions share the positives s_ii)."""
    row_lse, row_mean, col_lse, col_mean, positive, i2t, t2i = _FusedTiles.apply(u, v, scale, chunk, precision)
    i2t_loss = (row_lse - (1.0 - smoothing) * positive - smoothing * row_mean).mean()
    t2i_loss = (col_lse - (1.0 - smoothing) * positive - smoothing * col_mean).mean()
    return (i2t_loss + t2i_loss) / 2, i2t, t2i


def align_vl_loss_with_stats(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor,
                             smoothing: float = 0.0, chunk_size: int | None = None,
                             matmul_precision: str = "fp32", check_finite: bool = True) -> LossOutput:
    """The loss plus in-batch top-1 accuracies, see `align_vl_loss`; check_finite: see
    `global_value_local_gradient`."""
    validate_inputs(image_emb, text_emb, smoothing, chunk_size, matmul_precision)
    check_equal_local_batches(image_emb)
    rank, world = rank_world()
    # fp32 math whatever the towers run in: bf16 logits lose the ranking at large N.
    u, v = image_emb.float(), text_emb.float()
    scale = logit_scale.float().reshape(())
    if chunk_size is None:
        all_u, all_v = gather_with_grad(u), gather_with_grad(v)
        offset = u.shape[0] * rank
        loss_i2t, correct_i2t = _direction_loss(u, all_v, scale, offset, smoothing)
        loss_t2i, correct_t2i = _direction_loss(v, all_u, scale, offset, smoothing)
        local = (loss_i2t + loss_t2i) / 2
    else:
        local, correct_i2t, correct_t2i = _fused_loss(u, v, scale, smoothing, chunk_size, matmul_precision)
    return global_value_local_gradient(local, correct_i2t, correct_t2i, u.shape[0] * world, check_finite)


def align_vl_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, smoothing: float = 0.0,
                  chunk_size: int | None = None, matmul_precision: str = "fp32") -> Tensor:
    """Symmetric InfoNCE with Embedding Smoothing over the global (all-rank) batch.

    Args:
        image_emb, text_emb: this rank's (B, d) rows, L2-normalized by the caller; row i of
            each is a pair. With a process group initialized, all ranks' rows are gathered
            (equal B required) into the N = B * world global batch.
        logit_scale: the temperature multiplier exp(t), already clamped. The clamp lives in
            `alignvl_scale.model.head.Temperature.forward`, not here and not in place after the
            step (under ZeRO the optimizer updates fp32 master copies).
        smoothing: alpha in [0, 1); targets (1 - alpha) [i == j] + alpha / N. 0 is CLIP.
        chunk_size: None for the plain B x N logits per direction (the reference path); an
            int for the fused path: tiles of at most that many columns, each computed once
            for both directions and once more in backward (same value and gradients).
        matmul_precision: the fused path's tile matmuls: fp32 (default), tf32 (CUDA tensor
            cores; fp32 on CPU) or bf16 (split bf16, three tensor-core products with fp32
            accumulation, see `tile_matmul`). The log-sum-exp and all the rest stay fp32.

    Returns the global loss on every rank, with the local-share gradient described in the
    module docstring (average parameter gradients over ranks to get the global gradient).
    """
    return align_vl_loss_with_stats(image_emb, text_emb, logit_scale, smoothing, chunk_size,
                                    matmul_precision).loss
