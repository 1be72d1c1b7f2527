"""The sigmoid objective (SigLIP, Zhai et al. 2023) with Align-VL's Embedding Smoothing,
over the global batch, in memory linear in the batch.

Notation as in infonce.py: N pairs over all ranks, B = N / world on each, u_i and v_j the
normalized embeddings. Every pair is its own binary problem:

    z_ij = scale * u_i . v_j + bias,    t_ij = (1 - alpha) [i == j] + alpha / N
    l_ij = -t_ij log sigmoid(z_ij) - (1 - t_ij) log sigmoid(-z_ij) = softplus(z_ij) - t_ij z_ij
    L    = (1 / N) sum_ij l_ij

alpha = 0 is open_clip's `SigLipLoss` exactly (labels +1 on the pairs, -1 elsewhere, summed
over pairs and divided by the batch). alpha > 0 gives every pair the same target Embedding
Smoothing gives the softmax (docs/design.md derives what it pushes the logits toward). Per
row, sum_j t_ij z_ij = (1 - alpha) z_ii + (alpha / N) sum_j z_ij: no target matrix is built.

Distribution: the pair set is symmetric, so one direction covers it. Rank r takes its B
image rows against all N texts (gathered, N x d floats, as the InfoNCE path gathers them;
docs/design.md compares this with open_clip's neighbour exchange); over ranks every pair is
counted once. The fused path walks tiles of at most chunk x chunk once, in forward, where
the loss terms and dl/dz_ij = sigmoid(z_ij) - t_ij are formed on each tile, positives
included, so that the gradient products see the small net gradient; their sums wait for
backward, which scales them and reduces the texts' gradients to their owners. Three tile
products in all, against four for a loss that recomputes (and open_clip's three, which keep
every logit). Memory: O(chunk^2 + N x d).

Gradient convention: tiles.py's (global value, local-share gradient); rank r's share is
L_r = (1 / B) sum over its rows, and mean_r L_r = L.
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
    check_equal_local_batches,
    gather_with_grad,
    global_value_local_gradient,
    own_diagonal,
    tile_matmul,
    validate_inputs,
)
from alignvl_scale.runtime.distributed import rank_world


class _SigmoidTiles(torch.autograd.Function):
    """This rank's share L_r, and its gradients, from one pass over the tiles of
    z = scale * U_r V^T + bias.

    dl/dz_ij = sigmoid(z_ij) - t_ij needs nothing from other tiles, so forward forms it on
    each tile as soon as the loss terms are taken, and accumulates the tile's three
    products' worth of gradient: z (one product), then dZ V and dZ^T U (two more). Backward
    only scales the sums by the incoming gradient and returns the texts' gradients to their
    owners (one reduce per rank). Memory: the tile, B x d and N x d sums.

    Exact forms where the naive one cancels: a positive's loss is softplus(-z) + alpha z
    (not softplus(z) - (1 - alpha) z) and its gradient alpha - sigmoid(-z) (not
    sigmoid(z) - (1 - alpha)): at z = 17 the naive gradient is 0 in fp32, the true one
    -4.1e-8. The uniform target alpha / N is taken out of the tiles: sum_ij z_ij =
    scale (sum_i u_i).(sum_j v_j) + B N bias, and its gradient terms are rank one.

    Without gradient, forward also counts the local pairs that score strictly above every
    other candidate of their row (image -> text) and of their column over all ranks (text
    -> image; N floats of all-reduce), ties against the model as in evaluation.
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, bias: Tensor, smoothing: float, chunk: int,
                precision: str, with_gradient: bool):
        rank, world = rank_world()
        b, n = u.shape[0], u.shape[0] * world
        texts = GatheredTexts(v)
        scaled = scale * u  # the scale fused into the product
        softplus_sum, sigmoid_sum = torch.zeros((), device=u.device), torch.zeros((), device=u.device)
        positive = torch.empty(b, device=u.device)
        row_best = torch.full((b,), float("-inf"), device=u.device)  # best other than the positive
        col_best = torch.full((n,), float("-inf"), device=u.device)
        grad_rows = torch.zeros_like(u)  # sum_j dl/dz_ij v_j, without the uniform target's share
        grad_cols = torch.zeros(n, u.shape[1], device=u.device)  # sum_i dl/dz_ij u_i, every rank's texts
        for k, rows, c0, cols, v_tile in texts.tiles(chunk):
            z = tile_matmul(scaled[rows], v_tile.T, precision, add=bias)
            own = own_diagonal(z, rows, c0) if k == rank else None
            row_other, col_other = best_others(z, own[1] if own else None)
            row_best[rows] = torch.maximum(row_best[rows], row_other)
            col_best[cols] = torch.maximum(col_best[cols], col_other)
            terms = F.softplus(z)
            if own is not None:
                positive[own[0]] = own[1]
                own_diagonal(terms, rows, c0)[1].zero_()  # the positives' exact terms are added below
            softplus_sum += terms.sum()
            if with_gradient:
                grad = torch.sigmoid_(z)
                if own is not None:
                    own[1].copy_(smoothing - torch.sigmoid(-positive[own[0]]))
                sigmoid_sum += grad.sum()
                grad_rows[rows] += tile_matmul(grad, v_tile, precision)
                grad_cols[cols] += tile_matmul(grad.T, u[rows], precision)
        if world > 1:
            dist.all_reduce(col_best, op=dist.ReduceOp.MAX)
        u_sum, v_sum = u.sum(dim=0), texts.sum()
        z_sum = scale * (u_sum @ v_sum) + b * n * bias
        local = (softplus_sum + (F.softplus(-positive) + smoothing * positive).sum() - smoothing / n * z_sum) / b
        if with_gradient:  # the uniform target's share: -alpha / N on every pair
            grad_rows -= smoothing / n * v_sum
            grad_cols -= smoothing / n * u_sum
            grad_scale = (u * grad_rows).sum()  # sum_ij dl/dz_ij u_i . v_j
            ctx.save_for_backward(grad_rows, grad_cols, scale, grad_scale, sigmoid_sum - smoothing * b)
        i2t_correct = (positive > row_best).sum()
        t2i_correct = (positive > col_best[rank * b:(rank + 1) * b]).sum()
        ctx.mark_non_differentiable(i2t_correct, t2i_correct)
        return local, i2t_correct, t2i_correct

    @staticmethod
    def backward(ctx, g_local, _i2t, _t2i):
        grad_rows, grad_cols, scale, grad_scale, grad_bias = ctx.saved_tensors
        rank, world = rank_world()
        b = grad_rows.shape[0]
        g = g_local / b
        grad_cols = grad_cols * (g * scale)
        pending = [dist.reduce(grad_cols[k * b:(k + 1) * b], dst=k, async_op=True) for k in range(world)
                   ] if world > 1 else []
        for work in pending:
            work.wait()
        return (grad_rows * (g * scale), grad_cols[rank * b:(rank + 1) * b], (g * grad_scale).reshape(scale.shape),
                (g * grad_bias).reshape(()), None, None, None, None)


def _plain_sigmoid(u: Tensor, v: Tensor, scale: Tensor, bias: Tensor, smoothing: float):
    """The B x N logits of this rank's rows, by autograd: the reference path."""
    rank, world = rank_world()
    b, n = u.shape[0], u.shape[0] * world
    z = scale * (u @ gather_with_grad(v).T) + bias
    own = torch.arange(b, device=u.device) + rank * b
    rows = torch.arange(b, device=u.device)
    # l_ij = softplus(z_ij) - t_ij z_ij, a positive's as softplus(-z) + alpha z (no cancellation
    # at large z, in the value or in autograd's gradient: the fused path's exact forms)
    signed = z.clone()
    signed[rows, own] = -z[rows, own]
    local = (F.softplus(signed).sum() + smoothing * z[rows, own].sum() - smoothing / n * z.sum()) / b
    others = z.detach().clone()
    others[rows, own] = float("-inf")
    col_best = others.amax(dim=0)
    if world > 1:
        dist.all_reduce(col_best, op=dist.ReduceOp.MAX)
    positive = z.detach()[rows, own]
    return local, (positive > others.amax(dim=1)).sum(), (positive > col_best[own]).sum()


def sigmoid_loss_with_stats(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                            smoothing: float = 0.0, chunk_size: int | None = None,
                            matmul_precision: str = "fp32", check_finite: bool = True) -> LossOutput:
    """The sigmoid loss with Embedding Smoothing over the global batch, plus in-batch top-1
    accuracies.

    Args as `alignvl_scale.losses.infonce.align_vl_loss`, and logit_bias: the learned bias b added
    to every scaled similarity. smoothing: alpha in [0, 1), targets (1 - alpha) on the pair
    + alpha / N everywhere (0: SigLIP). chunk_size None: the plain B x N logits (the
    reference); an int: the fused tiles (same value and gradients). check_finite: see
    `alignvl_scale.losses.tiles.global_value_local_gradient`.

    Returns the global loss on every rank, with the local-share gradient (average parameter
    gradients over ranks to get the global gradient), for embeddings, scale and bias.
    """
    validate_inputs(image_emb, text_emb, smoothing, chunk_size, matmul_precision)
    check_equal_local_batches(image_emb)
    _, world = rank_world()
    u, v = image_emb.float(), text_emb.float()  # fp32 math whatever the towers run in
    scale, bias = logit_scale.float().reshape(()), logit_bias.float().reshape(())
    if chunk_size is None:
        local, i2t, t2i = _plain_sigmoid(u, v, scale, bias, smoothing)
    else:
        with_gradient = torch.is_grad_enabled() and any(
            t.requires_grad for t in (image_emb, text_emb, logit_scale, logit_bias))
        local, i2t, t2i = _SigmoidTiles.apply(u, v, scale, bias, smoothing, chunk_size, matmul_precision,
                                              with_gradient)
    return global_value_local_gradient(local, i2t, t2i, u.shape[0] * world, check_finite)


def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                 smoothing: float = 0.0, chunk_size: int | None = None, matmul_precision: str = "fp32") -> Tensor:
    """The loss of `sigmoid_loss_with_stats` alone."""
    return sigmoid_loss_with_stats(image_emb, text_emb, logit_scale, logit_bias, smoothing, chunk_size,
                                   matmul_precision).loss
