"""Randomness keyed by the sample, not the rank: every draw of a training forward (the head's
mixup, noise and adapter dropout; a trainable tower's dropout) comes from generators seeded
by the rows it is drawn for, so a sample gets the same draws on any rank and any number of
ranks, in either pass of the gradient accumulation and in an activation checkpoint's
recomputation, and nothing needs checkpointing (docs/design.md, "Data streams and
randomness keyed by the sample").

A training batch carries its `RowKeys` (which data stream's share each row is, in which
micro-batch of which epoch: data/streams.py); `drawing_for(rows)` makes them current, and
the rows of stream s draw from a generator seeded by (run seed, what is drawn, epoch,
micro-batch, s) (`runtime/seeding.row_block_seed`). Without keys (outside the trainer) the
head's modules draw from their own generators, seeded from (run seed, rank) and
checkpointed with `rng_state()`, and the towers from torch's.

A tower is third-party code: its dropout is found where it is drawn, not where it is
declared. `tower_draws` is a torch function mode around the tower's forward that takes
over every `F.dropout` (nn.Dropout's, eager attention's, PEFT's LoRA dropout) and every
`scaled_dot_product_attention` with a dropout probability (computed as its reference math
with a keyed mask), the n-th of them in the forward drawing for "<tower>.n".
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from alignvl_scale.data.streams import RowKeys
from alignvl_scale.runtime.seeding import row_block_seed

_ROWS: ContextVar[RowKeys | None] = ContextVar("alignvl_rows", default=None)


@contextmanager
def drawing_for(rows: RowKeys | None) -> Iterator[None]:
    """The draws inside are keyed by `rows` (None: the modules' own generators)."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def keyed_generators(keys: RowKeys, run_seed: int, name: str, rows: int, device: torch.device
                     ) -> list[tuple[torch.Generator, int]]:
    """(generator, rows) blocks that together cover `rows` rows in order, one per data
    stream of `keys`: what draw `name` of those rows is drawn from."""
    if rows % keys.count:
        raise ValueError(f"{rows} rows do not split into the batch's {keys.count} data streams")
    return [(torch.Generator(device=device).manual_seed(row_block_seed(run_seed, name, keys.epoch, keys.index, stream)),
             rows // keys.count) for stream in keys.streams()]


def keyed_keep_mask(x: Tensor, p: float, blocks: list[tuple[torch.Generator, int]]) -> Tensor:
    """Dropout's scaled keep mask for x (rows first), its rows drawn block by block."""
    masks = [torch.empty((n, *x.shape[1:]), device=x.device, dtype=x.dtype).bernoulli_(1 - p, generator=g)
             for g, n in blocks]
    return (masks[0] if len(masks) == 1 else torch.cat(masks)).mul_(1 / (1 - p))


class _Seeded(nn.Module):
    """A module that draws random numbers: keyed by the rows being drawn for (`draws`), or
    from its own generator, created lazily on the device of its first input."""

    def __init__(self, seed: int, run_seed: int = 0, name: str = "") -> None:
        """seed: its own generator's (per rank); run_seed and name: what its keyed draws are seeded with."""
        super().__init__()
        self.seed, self.run_seed, self.draw_name = seed, run_seed, name
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    def draws(self, rows: int, device: torch.device) -> list[tuple[torch.Generator, int]]:
        """(generator, rows) blocks that together cover `rows` rows in order: one per data
        stream of the current RowKeys, or one block from this module's own generator."""
        keys = _ROWS.get()
        if keys is None:
            return [(self.generator(device), rows)]
        return keyed_generators(keys, self.run_seed, self.draw_name, rows, device)

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def rng_state(self) -> Tensor | None:
        return self._generator.get_state() if self._generator is not None else self._pending_state

    def load_rng_state(self, state: Tensor | None) -> None:
        """None (a state taken before the first draw) restarts the stream from the seed."""
        if state is None:
            self._generator, self._pending_state = None, None
        elif self._generator is not None:
            self._generator.set_state(state)
        else:
            self._pending_state = state


class KeyedDropout(_Seeded):
    """nn.Dropout whose mask rows are drawn per data stream (`_Seeded.draws`); without
    RowKeys, torch's own dropout (the process generator)."""

    def __init__(self, p: float, run_seed: int, name: str) -> None:
        super().__init__(0, run_seed, name)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if _ROWS.get() is None:
            return F.dropout(x, self.p, training=True)
        return x * keyed_keep_mask(x, self.p, self.draws(x.shape[0], x.device))


def keyed_dropout(module: nn.Module, run_seed: int, prefix: str) -> nn.Module:
    """`module` with each nn.Dropout replaced by a KeyedDropout named by its place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Dropout):
            setattr(module, name, KeyedDropout(child.p, run_seed, f"dropout.{prefix}.{name}"))
        else:
            keyed_dropout(child, run_seed, f"{prefix}.{name}")
    return module


_TOWER_DRAWS: ContextVar[TowerDraws | None] = ContextVar("alignvl_tower_draws", default=None)


class TowerDraws(TorchFunctionMode):
    """Inside a trainable tower's training forward: every dropout it draws, keyed by the rows
    (module docstring). `first_call`: where the count of draws starts (an activation
    checkpoint's recomputation replays its block's)."""

    def __init__(self, rows: RowKeys, run_seed: int, prefix: str, first_call: int = 0) -> None:
        super().__init__()
        self.rows, self.run_seed, self.prefix, self.calls = rows, run_seed, prefix, first_call

    def keep(self, x: Tensor, p: float) -> Tensor:
        self.calls += 1
        blocks = keyed_generators(self.rows, self.run_seed, f"{self.prefix}.{self.calls}", x.shape[0], x.device)
        return keyed_keep_mask(x, p, blocks)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training = _arguments(args, kwargs, ("input", None), ("p", 0.5), ("training", True))
            if training and p > 0:
                return x * self.keep(x, p)
        elif func is F.scaled_dot_product_attention and _arguments(args, kwargs, ("dropout_p", 0.0), at=4)[0] > 0:
            return self.attention(*args, **kwargs)
        return func(*args, **kwargs)

    def attention(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False) -> Tensor:
        """scaled_dot_product_attention as its documented reference math, the attention
        weights' dropout keyed (rows: the batch, query's first dimension)."""
        if enable_gqa:
            groups = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
        scores = query @ key.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
        if is_causal:
            causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else scores + attn_mask)
        weights = scores.softmax(dim=-1)
        return (weights * self.keep(weights, dropout_p)) @ value

    def __enter__(self):
        self._token = _TOWER_DRAWS.set(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _TOWER_DRAWS.reset(self._token)
        return super().__exit__(*exc)


def _arguments(args: tuple, kwargs: dict, *names: tuple[str, object], at: int = 0) -> list:
    """The values of parameters `names` ((name, default), positions from `at` on) of a call."""
    return [args[at + i] if at + i < len(args) else kwargs.get(name, default)
            for i, (name, default) in enumerate(names)]


def tower_draws(rows: RowKeys | None, run_seed: int, prefix: str):
    """The context a trainable tower's training forward runs in (`TowerDraws`); None rows
    (no keys, or a frozen tower or eval): nothing changes."""
    return nullcontext() if rows is None else TowerDraws(rows, run_seed, prefix)


def checkpoint_contexts():
    """torch.utils.checkpoint's context_fn: its recomputation of a block draws as the forward
    did (the same rows, the count of draws where the block began)."""
    draws = _TOWER_DRAWS.get()
    if draws is None:
        return nullcontext(), nullcontext()
    return nullcontext(), TowerDraws(draws.rows, draws.run_seed, draws.prefix, draws.calls)
