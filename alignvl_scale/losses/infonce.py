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
text->image LSE down its columns (one exponential per element where that is exact), and
recomputes each tile once in backward.

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
    best_others,
    block_tiles,
    check_equal_local_batches,
    gather_with_grad,
    global_value_local_gradient,
    own_diagonal,
    tile_matmul,
    validate_inputs,
)
from alignvl_scale.runtime.distributed import rank_world

# The widest spread of column maxima in a tile that one exponential per element serves both
# directions exactly: fp32's exp stays normal down to -87, and a column's terms within
# 17 + ln(N) (<= 27 for N <= 2^23) of its maximum are the ones that reach its sum.
ONE_EXP_SPREAD = 87.0 - 27.0


def _tile_sums(s: Tensor, row_max: Tensor, col_max: Tensor, at: tuple[slice, int] | None) -> tuple[Tensor, Tensor]:
    """Each row's and each column's sum of exponentials in a tile relative to its maximum,
    the positives left out (at: the tile's rows and first column where it holds positives):
    sum_{j != i} exp(s_ij - row_max_i) and sum_{i != j} exp(s_ij - col_max_j).

    Rows: e_ij = exp(s_ij - row_max_i), one exponential per element. Columns from the same
    e: sum_i exp(s_ij - M) = sum_i exp(row_max_i - M) e_ij (M the tile's maximum), a
    vector-matrix product, exact while every column's maximum is within ONE_EXP_SPREAD of M
    (docs/design.md derives it; a shift shared by the whole tile alone is not: at scale 100
    it underflows), then brought to the column's own maximum by exp(M - col_max_j). Both
    vector factors take their differences in float64: fp32 rounds a difference of two
    scores near 100 by up to 4e-6, which a confident pair's small net gradient does not
    survive. Other tiles, and CUDA (no host read per tile; its passes are bound by memory,
    not by exponentials), take each column's own shift: a second exponential."""
    def without_positives(e: Tensor) -> Tensor:
        if at is not None:
            own_diagonal(e, *at)[1].zero_()
        return e

    e = without_positives(torch.sub(s, row_max[:, None]).exp_())
    rows = e.sum(dim=1)
    top = row_max.max()
    if not s.is_cuda and top - col_max.min() <= ONE_EXP_SPREAD:
        to_top, from_top = (row_max.double() - top).exp().float(), (top - col_max.double()).exp().float()
        return rows, (to_top @ e) * from_top
    return rows, without_positives(torch.sub(s, col_max[None, :], out=e).exp_()).sum(dim=0)


def _merge_sums(peak: Tensor, others: Tensor, tile_peak: Tensor, tile_others: Tensor) -> None:
    """Online log-sum-exp kept as (running maximum, sum of exp(s - maximum) over all but the
    positive), in place. The log-sum-exp is peak + log(others + exp(s_ii - peak)), but
    backward uses the parts: exp(s - peak) is exact at the maximum, the normalizer enters as
    a factor near 1 instead of as a shift of the size of the scale (whose fp32 ulp, 7.6e-6
    at 64-128, is the size of a confident pair's gradient), and a positive's softmax minus
    its target is -others / total, without the cancellation of p_ii - 1."""
    merged = torch.maximum(peak, tile_peak)
    others.mul_(torch.exp(peak - merged)).add_(tile_others * torch.exp(tile_peak - merged))
    peak.copy_(merged)


class _FusedTiles(torch.autograd.Function):
    """Both directions' statistics of S = scale * U_r V^T from one pass over its tiles.

    U_r is this rank's B image rows; V is every rank's text rows, gathered here while this
    rank's own columns are processed. For local image i and local text j (columns combined
    over ranks: an all-reduce of 2N maxima, then of 2N sums):

        row_lse_i = LSE_j s_ij,   row_mean_i = mean_j s_ij   (image -> text)
        col_lse_j = LSE_i s_ij,   col_mean_j = mean_i s_ij   (text -> image)
        diagonal_i = s_ii                                    (the positives)

    and, without gradient, how many local pairs score strictly higher than every other
    candidate in their row and in their column (a tie counts against the model, as in
    evaluation: `metrics.py`). The means are products of sums (mean_j s_ij = scale u_i .
    mean_j v_j): no pass over the tiles. Each tile of at most chunk x chunk is computed once
    in forward and once in backward, where the whole dL/ds_ij of both directions is formed
    on it, positives included, so that the gradient matmuls see the small net gradient and
    not two large terms that cancel (at scale 100, for the same bf16 matmuls, 0.85% gradient
    error with the positives outside, 0.25% inside); the means' share of it is rank one and
    added to the sums, not to the tiles. Backward all-gathers the N column gradients, and
    returns each rank's V rows summed over ranks with one reduce per rank, issued as soon as
    that block is done (overlapping the next block). Memory: O(chunk^2 + N x d).
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, chunk: int, precision: str):
        rank, world = rank_world()
        b, n = u.shape[0], u.shape[0] * world
        texts = GatheredTexts(v)
        scaled = scale * u  # the scale fused into the product
        row_peak, row_others = torch.full((b,), float("-inf"), device=u.device), torch.zeros(b, device=u.device)
        row_best = torch.full((b,), float("-inf"), device=u.device)  # best other than the positive
        # over the local rows: each text's maximum, the best other than its positive, its others' sum
        col = torch.full((2, n), float("-inf"), device=u.device)
        col_others = torch.zeros(n, device=u.device)
        diagonal = torch.empty(b, device=u.device)
        for k, rows, c0, cols, v_tile in texts.tiles(chunk):
            s = tile_matmul(scaled[rows], v_tile.T, precision)
            own = own_diagonal(s, rows, c0) if k == rank else None
            row_max, col_max = best_others(s, own[1] if own else None)
            row_best[rows] = torch.maximum(row_best[rows], row_max)
            col[1, cols] = torch.maximum(col[1, cols], col_max)
            if own is not None:  # the tile's maxima, positives included
                first, positives = own
                diagonal[first] = positives
                at_rows, at_cols = slice(first.start - rows.start, first.stop - rows.start), slice(
                    first.start - c0, first.stop - c0)
                row_max[at_rows] = torch.maximum(row_max[at_rows], positives)
                col_max[at_cols] = torch.maximum(col_max[at_cols], positives)
            tile_row_others, tile_col_others = _tile_sums(s, row_max, col_max, (rows, c0) if own else None)
            _merge_sums(row_peak[rows], row_others[rows], row_max, tile_row_others)
            _merge_sums(col[0, cols], col_others[cols], col_max, tile_col_others)
        own_texts = slice(rank * b, (rank + 1) * b)
        col_positive = torch.zeros(n, device=u.device)
        col_positive[own_texts] = torch.exp(diagonal - col[0, own_texts])
        u_sum, v_sum = u.sum(dim=0), texts.sum()
        if world > 1:
            peak = col.clone()
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            rescale = torch.exp(col[0] - peak[0])
            sums = torch.cat([col_others * rescale, col_positive * rescale, u_sum])
            dist.all_reduce(sums)
            col, (col_others, col_positive, u_sum) = peak, sums.split([n, n, u_sum.shape[0]])
        row_total, col_total = row_others + torch.exp(diagonal - row_peak), col_others + col_positive
        row_lse, col_lse = row_peak + row_total.log(), col[0] + col_total.log()
        ctx.save_for_backward(u, texts.all(), scale, row_peak, row_others, row_total, col[0], col_others[own_texts],
                              col_total)
        ctx.chunk, ctx.precision = chunk, precision
        i2t_correct = (diagonal > row_best).sum()
        t2i_correct = (diagonal > col[1, own_texts]).sum()
        ctx.mark_non_differentiable(i2t_correct, t2i_correct)
        row_mean, col_mean = scale * (u @ v_sum) / n, scale * (v @ u_sum) / n
        return row_lse, row_mean, col_lse[own_texts], col_mean, diagonal, i2t_correct, t2i_correct

    @staticmethod
    def backward(ctx, g_row_lse, g_row_mean, g_col_lse, g_col_mean, g_diagonal, _i2t, _t2i):
        u, v_all, scale, row_peak, row_others, row_total, col_peak, own_col_others, col_total = ctx.saved_tensors
        rank, world = rank_world()
        b, n, precision = u.shape[0], v_all.shape[0], ctx.precision
        g_col = torch.stack([g_col_lse, g_col_mean]).contiguous()
        if world > 1:
            parts = [torch.empty_like(g_col) for _ in range(world)]
            dist.all_gather(parts, g_col)
            g_col = torch.cat(parts, dim=1)
        g_col_lse, g_col_mean = g_col
        # dL/ds_ij = exp(s_ij - row_lse_i) g_row_lse_i + exp(s_ij - col_lse_j) g_col_lse_j
        #            + (g_row_mean_i + g_col_mean_j) / N + [i == j] g_diagonal_i
        # with exp(s - lse) g = exp(s - peak) (g / total): exact at the maximum, linear in g;
        # and on the positives, whose softmax is 1 - others / total, the same sum written as
        # (g_diagonal_i + g_row_lse_i + g_col_lse_i) - g_row_lse_i others_i / total_i - ...:
        # the incoming gradients cancel first, exactly, and the small rest is formed apart.
        row_factor, col_factor = g_row_lse / row_total, g_col_lse / col_total
        own_texts = slice(rank * b, (rank + 1) * b)
        positives_grad = ((g_diagonal + g_row_lse + g_col_lse[own_texts]) - row_factor * row_others
                          - col_factor[own_texts] * own_col_others)
        scaled = scale * u
        # the means' rank-one share, (g_row_mean_i + g_col_mean_j) / N on every pair, in the sums:
        # sum_i g_row_mean_i u_i / N for every text, and sum_i u_i / N times g_col_mean_j
        row_means_share, u_mean = (g_row_mean @ u) / n, u.sum(dim=0) / n
        grad_rows = torch.zeros_like(u)  # sum_j dL/ds_ij v_j
        own_block, pending = None, []
        for k in range(world):  # rank order on every rank: the reduces pair up
            grad_block = torch.zeros_like(u)  # sum over this rank's i of dL/ds_ij u_i, rank k's texts j
            for rows, c0, cols, v_tile in block_tiles(k, v_all[k * b:(k + 1) * b], chunk=ctx.chunk):
                s = tile_matmul(scaled[rows], v_tile.T, precision)
                grad = torch.sub(s, row_peak[rows, None]).exp_().mul_(row_factor[rows, None])
                grad.addcmul_(s.sub_(col_peak[None, cols]).exp_(), col_factor[None, cols])
                own = own_diagonal(grad, rows, c0) if k == rank else None
                if own is not None:
                    own[1].copy_(positives_grad[own[0]])
                grad_rows[rows] += tile_matmul(grad, v_tile, precision)
                grad_block[c0:c0 + v_tile.shape[0]] += tile_matmul(grad.T, u[rows], precision)
            grad_block += row_means_share + g_col_mean[k * b:(k + 1) * b, None] * u_mean
            grad_block *= scale
            if world > 1:
                pending.append(dist.reduce(grad_block, dst=k, async_op=True))
            if k == rank:
                own_block = grad_block
        grad_rows += g_row_mean[:, None] * (v_all.sum(dim=0) / n) + (g_col_mean @ v_all) / n
        grad_scale = (u * grad_rows).sum()  # sum_ij dL/ds_ij u_i . v_j
        for work in pending:
            work.wait()
        return scale * grad_rows, own_block, grad_scale.reshape(scale.shape), None, None


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
