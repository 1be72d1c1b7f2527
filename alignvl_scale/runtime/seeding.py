"""Every seed of a run comes from here (nanoGPT's one rule: the run's seed plus what tells the
streams apart). The values are those the project has always drawn, so that runs repeat across
versions; each stream's formula is written once, in `stream_seed`:

- "weights": the run seed itself, on every rank: the same initial weights everywhere.
- "process": torch's, numpy's and Python's global generators of one rank (dropout, shuffles):
  seed + P (rank + 1), plus Q step when a run resized at `step` re-seeds (its old ranks'
  streams cannot carry over to other ranks).
- "mixup", "image_noise", "text_noise": the head's own generators (model/head.py), three per
  rank: 3 (seed P + rank) + i at the start; process seed + 1 + i after a resize at `step`.
  What a head draws in training does not come from them: it is keyed by the rows drawn for,
  `row_block_seed`.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

P, Q = 1_000_003, 7_919  # primes: no two (rank, step) pairs of a run share a seed
HEAD_STREAMS = ("mixup", "image_noise", "text_noise")


def stream_seed(seed: int, stream: str, rank: int = 0, step: int | None = None) -> int:
    """The seed of one random stream of one rank; `step`: re-seeded after a resize at that step."""
    if stream == "weights":
        return seed
    process = seed + P * (rank + 1) + Q * (step or 0)
    if stream == "process":
        return process
    index = HEAD_STREAMS.index(stream)
    return 3 * (seed * P + rank) + index if step is None else process + 1 + index


def seed_everything(seed: int) -> None:
    """torch's, numpy's and Python's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def row_block_seed(seed: int, name: str, epoch: int, index: int, stream: int) -> int:
    """The seed of one data stream's rows in one micro-batch, for one kind of draw (`name`:
    "mixup", "image_noise", a dropout layer's place): no rank or world in it."""
    digest = hashlib.blake2b(f"{seed}:{name}:{epoch}:{index}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
