"""Each step's batches, agreed across ranks: every rank trains a step only when every rank has
its batches, and stops at the same step when any rank got a stop signal."""

from __future__ import annotations

import torch

from alignvl_scale.data.reader import DataError, TrainStream
from alignvl_scale.runtime.distributed import all_gather_objects, all_reduce_floats
from alignvl_scale.training.signals import StopRequested

ANOTHER_RANK = "a stop signal to another rank"


class AgreedBatches:
    def __init__(self, stream: TrainStream, stop: StopRequested, accumulation: int, device: torch.device) -> None:
        self.stream, self.stop, self.accumulation, self.device = stream, stop, accumulation, device
        self.batches = iter(stream)

    def next_step(self) -> list[dict] | str | None:
        """The next train.accumulation batches on every rank, or None on every rank when any
        rank runs out of data (so no rank waits in a collective the others left); an
        incomplete accumulation cycle at the end of an epoch is dropped, like a partial batch.
        A stop signal at any rank: its name on every rank, with the stream rewound to where
        this step began (so the checkpoint holds no batch that was not trained on). One host
        all-reduce per micro-batch carries both agreements."""
        before = self.stream.mark()
        micro = []
        for _ in range(self.accumulation):
            batch = next(self.batches, None)
            have, stop = all_reduce_floats([float(batch is not None), -float(self.stop.signal is not None)], "min")
            if stop < 0:
                self.stream.rewind(before)
                return self.stop.signal or ANOTHER_RANK
            if not have:
                return None
            micro.append({k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                          for k, v in batch.items()})  # fp32 stays fp32: bf16 runs cast inside autocast
        return micro

    def next_epoch(self) -> str | None:
        """At the end of an epoch: a stop asked for meanwhile, agreed before the next epoch's
        DataLoader workers start (its name), else the next epoch begins (None). An epoch that
        gave no batch at all stops the run (it would spin for ever); `batches` is the same on
        every rank, so they stop together."""
        self.batches.close()
        if all_reduce_floats([-float(self.stop.signal is not None)], "min")[0] < 0:
            return self.stop.signal or ANOTHER_RANK
        state, counts = self.stream.state, self.stream.counts
        if state.batches == 0:
            raise DataError(f"epoch {state.epoch} of {self.stream.cfg.train} gave rank {self.stream.rank} no batch of "
                            f"data.batch_size={self.stream.cfg.batch_size}: {counts.good} good samples so far, "
                            f"skipped {dict(counts.skipped)} (see `alignvl-scale data check`)")
        self.stream.next_epoch()
        self.batches = iter(self.stream)
        return None

    def close(self) -> None:
        """The DataLoader's workers shut down now (not at exit)."""
        self.batches.close()


def global_keys(micro: list[dict]) -> list[list[str]]:
    """The sample keys of a step on every rank, micro-batch by micro-batch in the global
    batch's order (the ranks' shares in rank order): the same on any world (log.sample_keys)."""
    ranks = all_gather_objects([batch["keys"] for batch in micro])
    return [[key for rank in ranks for key in rank[m]] for m in range(len(micro))]
