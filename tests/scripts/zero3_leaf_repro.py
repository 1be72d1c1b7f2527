"""A minimal repro of DeepSpeed ZeRO-3 leaf modules (`set_z3_leaf_module`, and
`stage3_module_granularity_threshold`, which sets them by size) running their backward on
released parameters. One process, CPU, gloo; two blocks x = x + attn(norm(x)) where each
`attn` (two Linears) is a leaf.

    python tests/scripts/zero3_leaf_repro.py positional   # attn(h), input needs a gradient: works
    python tests/scripts/zero3_leaf_repro.py keyword      # attn(x=h): fails
    python tests/scripts/zero3_leaf_repro.py no_grad      # first leaf's input needs no gradient: fails
    python tests/scripts/zero3_leaf_repro.py none         # no leaves: works

ZeRO-3 gathers a leaf's parameters for its backward from a hook on the leaf's positional
input tensors; a keyword input, or one that needs no gradient, gives it none, and the
backward fails with "The size of tensor a (0) must match the size of tensor b (32)".
transformers 5 calls attention with keyword arguments (`self_attn(hidden_states=...)`), and a
head fed by frozen towers has inputs that need no gradient: both ways are the trainer's.
Prints OK or the error's last line; exits 0 either way (the caller reads the line).
"""

import os
import sys

import deepspeed
import torch
import torch._dynamo  # noqa: F401  (imported before zero.Init patches tensor constructors)
from deepspeed.utils import set_z3_leaf_module
from torch import nn

from alignvl_scale.runtime.ds_ops import prepare_deepspeed_ops

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=os.environ.get("MASTER_PORT", "29561"))
CASE = sys.argv[1]


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.o(self.q(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(32), Attn()

    def forward(self, x):
        h = self.norm(x)
        return x + (self.attn(x=h) if CASE == "keyword" else self.attn(h))


prepare_deepspeed_ops(on_gpu=False)
deepspeed.init_distributed(dist_backend="gloo")
ds = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "zero_allow_untested_optimizer": True,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = nn.Sequential(Block(), Block())
if CASE != "none":
    for block in model:
        set_z3_leaf_module(block.attn, True)
    if CASE == "no_grad":  # a frozen first norm: the first leaf's input needs no gradient
        model[0].norm.requires_grad_(False)
engine, *_ = deepspeed.initialize(model=model, config=ds,
                                  optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
x = torch.randn(2, 4, 32, requires_grad=CASE != "no_grad")
try:
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    print("OK", flush=True)
except RuntimeError as exc:
    print(str(exc).strip().splitlines()[-1], flush=True)
