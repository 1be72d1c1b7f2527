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

from alignvl_scale.distributed import all_gather_floats, rank_world
from alignvl_scale.perf import matmul_tf32


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
    Local batch sizes must agree across ranks (see `check_equal_local_batches`)."""
    _, world = rank_world()
    return x if world == 1 else _AllGatherWithGrad.apply(x)


MATMUL_PRECISIONS = ("fp32", "tf32", "bf16")


def _bf16_pair(x: Tensor) -> tuple[Tensor, Tensor]:
    hi = x.bfloat16()
    return hi, (x - hi.float()).bfloat16()


def tile_matmul(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """a @ b, fp32 out, with the products at `precision`.

    bf16: split bf16 ("bf16x3"): with x = hi + lo (hi = bf16(x), lo = bf16(x - hi)), one
    bf16 matmul of [a_hi, a_hi, a_lo] and [b_hi; b_lo; b_hi] gives hi.hi + hi.lo + lo.hi
    with fp32 accumulation: about 2^-16 relative error instead of plain bf16's 2^-8, which
    in the loss's gradients is 0.25% (above the 1e-3 budget) against under 1e-5, for 3x
    the tensor-core work (torch.mm's out_dtype on CUDA; on CPU the same products computed
    in fp32, which is what it emulates). tf32: fp32 operands rounded to TF32 by the tensor
    cores (CUDA only; fp32 elsewhere). fp32: full fp32 even where train.tf32 made TF32 the
    process default.
    """
    if precision == "bf16":
        (a_hi, a_lo), (b_hi, b_lo) = _bf16_pair(a), _bf16_pair(b)
        a3, b3 = torch.cat([a_hi, a_hi, a_lo], dim=1), torch.cat([b_hi, b_lo, b_hi], dim=0)
        if a3.is_cuda:
            try:
                return torch.mm(a3, b3, out_dtype=torch.float32)
            except (TypeError, RuntimeError):  # a torch without out_dtype: exact, just slower
                pass
        return a3.float() @ b3.float()
    if a.is_cuda:  # tf32 or fp32 whatever the process default (train.tf32)
        with matmul_tf32(precision == "tf32"):
            return a @ b
    return a @ b


class GatheredTexts:
    """Every rank's text rows for a tiled pass (`_FusedTiles`, the sigmoid loss's tiles):
    gathered asynchronously, while this rank's own columns, which need no gather, are
    walked first."""

    def __init__(self, v: Tensor) -> None:
        self.rank, self.world = rank_world()
        self.v = v.contiguous()
        self.blocks, self._pending = [self.v] * self.world, None
        if self.world > 1:
            self.blocks = [torch.empty_like(self.v) for _ in range(self.world)]
            self._pending = dist.all_gather(self.blocks, self.v, async_op=True)

    def tiles(self, chunk: int):
        """(rank k, first local column c0, the global column slice, rank k's texts
        [c0:c0 + chunk]) for every tile, this rank's own first."""
        b = self.v.shape[0]
        for k in [self.rank] + [k for k in range(self.world) if k != self.rank]:
            if k != self.rank and self._pending is not None:
                self._pending.wait()
                self._pending = None
            block = self.v if k == self.rank else self.blocks[k]
            for c0 in range(0, b, chunk):
                tile = block[c0:c0 + chunk]
                yield k, c0, slice(k * b + c0, k * b + c0 + tile.shape[0]), tile

    def all(self) -> Tensor:
        """All N text rows in rank order (after `tiles` has run)."""
        return torch.cat(self.blocks) if self.world > 1 else self.v


def positives_and_others(tile: Tensor, own: bool, c0: int) -> tuple[Tensor | None, Tensor]:
    """A forward tile's positives (the diagonal of its rows c0.. when it holds this rank's own
    columns, else None) and the tile with them set to -inf: what "the best other candidate"
    of a row or column is taken over, for the in-batch accuracy."""
    if not own:
        return None, tile
    c1 = c0 + tile.shape[1]
    others = tile.clone()
    others[c0:c1].diagonal().fill_(float("-inf"))
    return tile[c0:c1].diagonal(), others


def tiled_backward(u: Tensor, v_all: Tensor, scale: Tensor, chunk: int, precision: str,
                   tile_gradient) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward walk of every tiled objective: each tile's `raw = u . v^T` recomputed
    once, `dL/ds = tile_gradient(k, c0, cols, raw)` formed on it (s = scale * raw + any
    bias), then the gradients of u, of the tile's texts, of the scale (sum dL/ds * raw) and
    the sum of dL/ds (a bias's gradient). The texts' gradients are summed over ranks onto
    their owners, one reduce per rank, issued as soon as that rank's block is done (all
    ranks in rank order). Returns (grad u, grad of this rank's texts, grad scale, sum dL/ds)."""
    rank, world = rank_world()
    b = u.shape[0]
    grad_u = torch.zeros_like(u)
    grad_scale, grad_sum = torch.zeros((), device=u.device), torch.zeros((), device=u.device)
    grad_blocks, pending = [], []
    for k in range(world):
        grad_block = torch.empty_like(u)
        for c0 in range(0, b, chunk):
            cols = slice(k * b + c0, min(k * b + c0 + chunk, (k + 1) * b))
            v_tile = v_all[cols]
            raw = tile_matmul(u, v_tile.T, precision)
            grad_s = tile_gradient(k, c0, cols, raw)
            grad_u += scale * tile_matmul(grad_s, v_tile, precision)
            grad_block[c0:c0 + raw.shape[1]] = scale * tile_matmul(grad_s.T, u, precision)
            grad_scale += (grad_s * raw).sum()
            grad_sum += grad_s.sum()
        grad_blocks.append(grad_block)
        if world > 1:
            pending.append(dist.reduce(grad_block, dst=k, async_op=True))
    for work in pending:
        work.wait()
    return grad_u, grad_blocks[rank], grad_scale, grad_sum


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


def validate_inputs(image_emb: Tensor, text_emb: Tensor, smoothing: float, chunk_size: int | None,
              matmul_precision: str) -> None:
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError("image_emb and text_emb must both be (local_batch, dim) with equal shapes, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {matmul_precision!r}")
    if matmul_precision != "fp32" and chunk_size is None:
        raise ValueError(f"matmul_precision {matmul_precision} needs chunk_size (the fused path); the plain path "
                         "is the fp32 reference")


def check_equal_local_batches(x: Tensor) -> None:
    """Every rank raises (none hangs at a later collective) when local batch sizes differ.
    On the host group: no device synchronization."""
    _, world = rank_world()
    if world == 1:
        return
    sizes = [int(s) for s in all_gather_floats(x.shape[0])]
    if len(set(sizes)) != 1:
        raise ValueError(f"local batch sizes differ across ranks: {sizes}; every rank must feed "
                         "the same micro batch (use equal-length data streams)")


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


def global_value_local_gradient(local: Tensor, correct_i2t: Tensor, correct_t2i: Tensor, n: int,
                                check_finite: bool = True) -> LossOutput:
    """Every objective's ending: this rank's share `local` becomes the global loss value
    (one all-reduce, with the in-batch correct counts), keeping the gradient of the share.
    check_finite: FloatingPointError on every rank alike when the global value is not finite
    (one host read of a device value); False leaves the check to the caller."""
    _, world = rank_world()
    stats = torch.stack([local.detach(), correct_i2t.float(), correct_t2i.float()])
    if world > 1:
        dist.all_reduce(stats)
    # One host sync, on values every rank shares: a bad embedding or scale anywhere makes
    # the summed loss non-finite on every rank, so all raise together.
    if check_finite and not torch.isfinite(stats[0]):
        raise FloatingPointError("non-finite embeddings, logit_scale or logit_bias in the contrastive batch")
    loss = local + (stats[0] / world - local).detach()
    return LossOutput(loss=loss, i2t_accuracy=stats[1] / n, t2i_accuracy=stats[2] / n)


def align_vl_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, smoothing: float = 0.0,
                  chunk_size: int | None = None, matmul_precision: str = "fp32") -> Tensor:
    """Symmetric InfoNCE with Embedding Smoothing over the global (all-rank) batch.

    Args:
        image_emb, text_emb: this rank's (B, d) rows, L2-normalized by the caller; row i of
            each is a pair. With a process group initialized, all ranks' rows are gathered
            (equal B required) into the N = B * world global batch.
        logit_scale: the temperature multiplier exp(t), already clamped. The clamp lives in
            `alignvl_scale.model.Temperature.forward`, not here and not in place after the
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
