"""Run a training and count, per optimizer step, what makes the host wait for the device:
device synchronizations (torch.cuda.synchronize, DeepSpeed's accelerator synchronize) and
tensor reads on the host (item, tolist, bool, float, int, cpu, numpy). On CPU none of them
waits, but each is where a CUDA run would; counting them here shows which step code
would stall a GPU. Prints one line `SYNCS <json>`: per step, the count of each kind and
where in this project's code (or the library frame nearest it) each came from.

    python tests/scripts/count_syncs.py --config RUN.yaml [key=value ...]
"""

import collections
import json
import sys
import traceback

import torch
from deepspeed.accelerator import get_accelerator

import alignvl_scale.training.main as main
import alignvl_scale.training.trainer as train

counts: collections.Counter = collections.Counter()
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def caller() -> str | None:
    """The innermost frame outside this file and torch's own Python: who asked. None for
    torch's optimizers, whose reads are of their step counters, host tensors also on CUDA."""
    stack = [f for f in traceback.extract_stack()[:-2] if "count_syncs" not in f.filename]
    if "/torch/optim/" in stack[-1].filename:
        return None
    for frame in reversed(stack):
        name = frame.filename
        if "/alignvl_scale/" in name:
            return f"alignvl_scale/{name.rsplit('/alignvl_scale/', 1)[1]}:{frame.lineno}"
        if "/torch/" not in name:
            return f"{name.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"
    return "?"


def counted(kind: str, real):
    def wrapper(*args, **kwargs):
        where = caller()
        if where is not None:
            counts[f"{kind} @ {where}"] += 1
        return real(*args, **kwargs)
    return wrapper


for name in READS:
    setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
torch.cuda.synchronize = counted("cuda.synchronize", torch.cuda.synchronize)
accelerator = type(get_accelerator())
accelerator.synchronize = counted("accelerator.synchronize", accelerator.synchronize)

per_step: list[dict] = []
real_train_step = train.Trainer.train_step


def counted_train_step(self, micro):
    counts.clear()
    out = real_train_step(self, micro)
    per_step.append(dict(counts))
    return out


if __name__ == "__main__":
    train.Trainer.train_step = counted_train_step
    main.main(sys.argv[1:])
    print("SYNCS " + json.dumps(per_step), flush=True)
