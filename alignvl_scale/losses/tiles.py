"""What every tiled objective shares: the gradient convention's ending, the autograd
all-gather, the tile matmul at a chosen precision, the walk over this rank's rows against
every rank's texts (forward tiles with the gather behind the own block, the recomputing
backward with one reduce per rank), and the input checks.

Gradient convention (the one DDP and DeepSpeed expect): every rank computes its own B rows
against all N columns; its loss has the *global* value, but carries the gradient of its local
share L_r (with mean_r L_r = L). The autograd all-gather sums the column gradients of every
rank back onto their owners, so after the engine averages parameter gradients over ranks they
equal the single-process gradients of L on the concatenated batch. Seen from rank r alone,
d loss / d (its embeddings) = world * dL/d(rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from alignvl_scale.config import MatmulPrecision, choices
from alignvl_scale.runtime.compat import mm_fp32_out
from alignvl_scale.runtime.distributed import all_gather_floats, rank_world
from alignvl_scale.runtime.perf import matmul_tf32


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


MATMUL_PRECISIONS = choices(MatmulPrecision)


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
        exact = mm_fp32_out(a3, b3) if a3.is_cuda else None  # None: a torch without it: exact, just slower
        return exact if exact is not None else a3.float() @ b3.float()
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


def argument_problems(smoothing: float, chunk_size: int | None, matmul_precision: str,
                      prefix: str = "") -> list[str]:
    """What is wrong with the losses' arguments, one sentence each ([] when nothing): the one
    statement of these rules. The losses raise ValueError with it; preflight a ConfigError
    (prefix "loss.": the config keys of the same names)."""
    found = []
    if not 0.0 <= smoothing < 1.0:
        found.append(f"{prefix}smoothing: must be in [0, 1), got {smoothing!r}")
    if chunk_size is not None and chunk_size < 1:
        found.append(f"{prefix}chunk_size: must be null (None) or >= 1, got {chunk_size!r}")
    if matmul_precision not in MATMUL_PRECISIONS:
        found.append(f"{prefix}matmul_precision: must be one of {', '.join(MATMUL_PRECISIONS)}, got "
                     f"{matmul_precision!r}")
    elif matmul_precision != "fp32" and chunk_size is None:
        found.append(f"{prefix}matmul_precision: must be fp32 unless {prefix}chunk_size is set (only the fused path "
                     f"has low-precision tiles; the plain path is the fp32 reference), got {matmul_precision!r}")
    return found


def validate_inputs(image_emb: Tensor, text_emb: Tensor, smoothing: float, chunk_size: int | None,
                    matmul_precision: str) -> None:
    problems = argument_problems(smoothing, chunk_size, matmul_precision)
    if problems:
        raise ValueError(problems[0])
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError("image_emb and text_emb must both be (local_batch, dim) with equal shapes, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")


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
