"""The run's own stateful parts, saved and loaded by the checkpoint manager beside the engine,
the data stream (data/reader.py `TrainStream`) and the logger (training/logger.py)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from alignvl_scale.runtime.seeding import seed_everything, stream_seed


@dataclasses.dataclass
class Progress:
    """Where the run stands: optimizer steps done, steps skipped as non-finite (in all, and in a
    row), and what the schedule was planned with: its length, the budget it came from
    ([train.steps, train.epochs]) and the contrastive batch."""

    total_steps: int
    contrastive_batch: int
    budget: list
    step: int = 0
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> str | None:
        """The saved counters. The schedule keeps the length it was planned with when the
        budget is the same (another world makes another number of steps per epoch); the
        contrastive batch is this run's, and a change is said."""
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.bad_steps_in_a_row = state["bad_steps_in_a_row"]
        notes = []
        if list(state.get("budget") or []) == list(self.budget) and "total_steps" in state:
            if state["total_steps"] != self.total_steps:
                notes.append(f"the schedule keeps its {state['total_steps']} steps (this world would make "
                             f"{self.total_steps})")
            self.total_steps = state["total_steps"]
        was = state.get("contrastive_batch", self.contrastive_batch)
        if was != self.contrastive_batch:
            notes.append(f"the contrastive batch changed from {was} to {self.contrastive_batch} (set "
                         "data.global_batch_size to keep it)")
        return "; ".join(notes) or None


class RandomState:
    """Every random stream of this rank: torch's (dropout), numpy's, Python's, CUDA's, and the
    head's own generators (mixup, noise), as tensors. After a resize the old ranks' streams
    cannot carry over to other ranks: new ones are seeded from (seed, rank, step)."""

    def __init__(self, seed: int, rank: int, modules: dict) -> None:
        self.seed, self.rank, self.modules = seed, rank, modules

    def state_dict(self) -> dict:
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
                 "numpy_rest": torch.tensor([pos, has_gauss, gauss], dtype=torch.float64),
                 "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        for name, module in self.modules.items():
            if module.rng_state() is not None:
                state[f"module.{name}"] = module.rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        pos, has_gauss, gauss = state["numpy_rest"].tolist()
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
        random.setstate((3, tuple(int(x) for x in state["python"]), None))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        for name, module in self.modules.items():
            module.load_rng_state(state.get(f"module.{name}"))

    def load_resharded(self, _old: list[dict], step: int) -> None:
        seed_everything(stream_seed(self.seed, "process", self.rank, step))
        for name, module in self.modules.items():
            generator = torch.Generator().manual_seed(stream_seed(self.seed, name, self.rank, step))
            module.load_rng_state(generator.get_state())
