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
counted once. The fused path walks B x chunk tiles, once in forward and once in backward,
where dl/dz_ij = sigmoid(z_ij) - t_ij is formed on the tile, positives included, so that
the gradient matmuls see the small net gradient. The texts' gradients are reduced to their
owners. Memory: O(B x chunk + N x d).

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
    check_equal_local_batches,
    gather_with_grad,
    global_value_local_gradient,
    positives_and_others,
    tile_matmul,
    tiled_backward,
    validate_inputs,
)
from alignvl_scale.runtime.distributed import rank_world


class _SigmoidTiles(torch.autograd.Function):
    """This rank's share L_r from one pass over the tiles of z = scale * U_r V^T + bias.

    Forward sums softplus(z) and z over the tiles and takes the positives z_ii; without
    gradient, it also counts the local pairs that score strictly above every other
    candidate of their row (image -> text) and of their column over all ranks (text ->
    image; N floats of all-reduce), ties against the model as in evaluation.
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, bias: Tensor, smoothing: float, chunk: int,
                precision: str):
        rank, world = rank_world()
        b, n = u.shape[0], u.shape[0] * world
        texts = GatheredTexts(v)
        softplus_sum = torch.zeros((), device=u.device)
        z_sum = torch.zeros((), device=u.device)
        row_best = torch.full((b,), float("-inf"), device=u.device)  # best other than the positive
        col_best = torch.full((n,), float("-inf"), device=u.device)
        positive = torch.empty(b, device=u.device)
        for k, c0, cols, v_tile in texts.tiles(chunk):
            z = scale * tile_matmul(u, v_tile.T, precision) + bias
            softplus_sum += F.softplus(z).sum()
            z_sum += z.sum()
            positives, others = positives_and_others(z, k == rank, c0)
            if positives is not None:
                positive[c0:c0 + len(positives)] = positives
            row_best = torch.maximum(row_best, others.amax(dim=1))
            col_best[cols] = others.amax(dim=0)
        if world > 1:
            dist.all_reduce(col_best, op=dist.ReduceOp.MAX)
        ctx.save_for_backward(u, texts.all(), scale, bias)
        ctx.smoothing, ctx.chunk, ctx.precision = smoothing, chunk, precision
        i2t_correct = (positive > row_best).sum()
        t2i_correct = (positive > col_best[rank * b:(rank + 1) * b]).sum()
        ctx.mark_non_differentiable(i2t_correct, t2i_correct)
        local = (softplus_sum - (1.0 - smoothing) * positive.sum() - smoothing / n * z_sum) / b
        return local, i2t_correct, t2i_correct

    @staticmethod
    def backward(ctx, g_local, _i2t, _t2i):
        u, v_all, scale, bias = ctx.saved_tensors
        rank, _ = rank_world()
        n, alpha, g = v_all.shape[0], ctx.smoothing, g_local / u.shape[0]

        def tile_gradient(k: int, c0: int, cols: slice, raw: Tensor) -> Tensor:
            grad_z = (torch.sigmoid(scale * raw + bias) - alpha / n) * g  # (sigmoid(z) - t) / B
            if k == rank:
                grad_z[c0:c0 + raw.shape[1]].diagonal().sub_((1.0 - alpha) * g)
            return grad_z

        grad_u, grad_v, grad_scale, grad_bias = tiled_backward(u, v_all, scale, ctx.chunk, ctx.precision,
                                                               tile_gradient)
        return grad_u, grad_v, grad_scale.reshape(scale.shape), grad_bias.reshape(bias.shape), None, None, None


def _plain_sigmoid(u: Tensor, v: Tensor, scale: Tensor, bias: Tensor, smoothing: float):
    """The B x N logits of this rank's rows, by autograd: the reference path."""
    rank, world = rank_world()
    b, n = u.shape[0], u.shape[0] * world
    z = scale * (u @ gather_with_grad(v).T) + bias
    own = torch.arange(b, device=u.device) + rank * b
    rows = torch.arange(b, device=u.device)
    targets = torch.full_like(z, smoothing / n)
    targets[rows, own] += 1.0 - smoothing
    local = (F.softplus(z) - targets * z).sum() / b
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
        local, i2t, t2i = _SigmoidTiles.apply(u, v, scale, bias, smoothing, chunk_size, matmul_precision)
    return global_value_local_gradient(local, i2t, t2i, u.shape[0] * world, check_finite)


def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                 smoothing: float = 0.0, chunk_size: int | None = None, matmul_precision: str = "fp32") -> Tensor:
    """The loss of `sigmoid_loss_with_stats` alone."""
    return sigmoid_loss_with_stats(image_emb, text_emb, logit_scale, logit_bias, smoothing, chunk_size,
                                   matmul_precision).loss
