"""What every tiled objective shares: the gradient convention's ending, the autograd
all-gather, the tile matmul at a chosen precision, the walk over chunk x chunk tiles of this
rank's rows against every rank's texts (the gather behind the own block), the positives and
best other candidates of a tile, and the input checks.

Gradient convention (the one DDP and DeepSpeed expect): every rank computes its own B rows
against all N columns; its loss has the *global* value, but carries the gradient of its local
share L_r (with mean_r L_r = L). The autograd all-gather sums the column gradients of every
rank back onto their owners, so after the engine averages parameter gradients over ranks they
equal the single-process gradients of L on the concatenated batch. Seen from rank r alone,
d loss / d (its embeddings) = world * dL/d(rows).
"""

from __future__ import annotations

from contextlib import nullcontext
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


def tile_matmul(a: Tensor, b: Tensor, precision: str, add: Tensor | None = None) -> Tensor:
    """a @ b (+ add, a scalar, in the same product where the backend fuses it), fp32 out,
    with the products at `precision`.

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
        product = exact if exact is not None else a3.float() @ b3.float()
        return product if add is None else product.add_(add)
    with matmul_tf32(precision == "tf32") if a.is_cuda else nullcontext():  # whatever the process default
        return a @ b if add is None else torch.addmm(add, a, b)


def block_tiles(k: int, block: Tensor, chunk: int):
    """(this rank's rows, k's first local column c0, the global column slice, k's texts
    [c0:c0 + chunk]) for every tile of at most chunk x chunk against rank k's `block` of
    texts: small enough that the elementwise passes over a tile run in cache. The rows vary
    fastest, so a tile's texts stay in cache across them."""
    b = block.shape[0]  # equal local batches: this rank has as many rows as k has texts
    for c0 in range(0, b, chunk):
        v_tile = block[c0:c0 + chunk]
        cols = slice(k * b + c0, k * b + c0 + v_tile.shape[0])
        for r0 in range(0, b, chunk):
            yield slice(r0, min(r0 + chunk, b)), c0, cols, v_tile


def own_diagonal(tile: Tensor, rows: slice, c0: int) -> tuple[slice, Tensor] | None:
    """The positives in a tile of this rank's own columns: (their local rows, a view of them in
    the tile), or None when the tile holds none."""
    first, end = max(rows.start, c0), min(rows.stop, c0 + tile.shape[1])
    if first >= end:
        return None
    return slice(first, end), tile[first - rows.start:end - rows.start, first - c0:end - c0].diagonal()


def best_others(tile: Tensor, diagonal: Tensor | None) -> tuple[Tensor, Tensor]:
    """The best candidate other than the positive of each row and each column of a tile (what
    the in-batch accuracy compares the positive with): the positives are set to -inf for the
    two reductions and put back, no copy of the tile."""
    if diagonal is None:
        return tile.amax(dim=1), tile.amax(dim=0)
    positives = diagonal.clone()
    diagonal.fill_(float("-inf"))
    best = tile.amax(dim=1), tile.amax(dim=0)
    diagonal.copy_(positives)
    return best


class GatheredTexts:
    """Every rank's text rows for a tiled forward pass (both objectives):
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
        """(rank k, *`block_tiles`) for every tile, this rank's own columns first."""
        for k in [self.rank] + [k for k in range(self.world) if k != self.rank]:
            if k != self.rank and self._pending is not None:
                self._pending.wait()
                self._pending = None
            for tile in block_tiles(k, self.v if k == self.rank else self.blocks[k], chunk):
                yield k, *tile

    def sum(self) -> Tensor:
        """All N text rows summed (after `tiles` has run): the uniform terms' factor."""
        return sum(block.sum(dim=0) for block in self.blocks)

    def all(self) -> Tensor:
        """All N text rows in rank order (after `tiles` has run)."""
        return torch.cat(self.blocks) if self.world > 1 else self.v


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
