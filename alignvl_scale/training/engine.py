"""Accelerate + DeepSpeed: the DeepSpeed JSON with its "auto" fields filled from the run
config (each batch size stated once, in `data.batch_size`), and the Accelerator.

The same code serves `deepspeed`, `accelerate launch` and `torchrun`: each sets RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, and Accelerate reads them.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

from alignvl_scale.config import DS_CONFIGS, PROJECT_ROOT, ConfigError, EngineConfig, RunConfig
from alignvl_scale.model.finetune import transformer_blocks
from alignvl_scale.runtime import compat
from alignvl_scale.runtime.distributed import backend
from alignvl_scale.runtime.ds_ops import prepare_deepspeed_ops

DEFAULT_DS_CONFIG = "zero2"


def _ds_config_file(path: str) -> Path:
    """A DeepSpeed JSON: a path as given, else relative to the source tree, else one shipped
    with the package by name (`zero2`, `zero2.json` or `ds_configs/zero2.json` all name
    alignvl_scale/ds_configs/zero2.json, also from an installed wheel)."""
    name = Path(path).name if Path(path).parent in (Path("."), Path("ds_configs")) else None
    shipped = [DS_CONFIGS / (name if name.endswith(".json") else f"{name}.json")] if name else []
    for candidate in (Path(path), PROJECT_ROOT / path, *shipped):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"engine.ds_config: must be an existing DeepSpeed JSON file or one of "
                      f"{', '.join(sorted(p.stem for p in DS_CONFIGS.glob('*.json')))}, got {path!r}")


def resolve_ds_config(cfg: EngineConfig) -> Path:
    """The run's DeepSpeed JSON: engine.ds_config, else the one an `accelerate launch` config
    names, else zero2; the two named differently is a ConfigError."""
    from_accelerate = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if cfg.ds_config and from_accelerate and _ds_config_file(cfg.ds_config) != _ds_config_file(from_accelerate):
        raise ConfigError(f"engine.ds_config: {cfg.ds_config} differs from the accelerate config's "
                          f"deepspeed_config_file {from_accelerate}; name one of them")
    return _ds_config_file(cfg.ds_config or from_accelerate or DEFAULT_DS_CONFIG)


def configured_stage(cfg: EngineConfig) -> int:
    """The ZeRO stage the run's DeepSpeed JSON asks for (before any process group)."""
    return zero_stage(json.loads(resolve_ds_config(cfg).read_text()))


def fill_ds_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict with every "auto" replaced by the run config's value.
    load_universal: the run resumes from a universal checkpoint (checkpoint.py)."""
    path = resolve_ds_config(cfg.engine)
    ds = json.loads(path.read_text())
    micro = cfg.data.batch_size
    values = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.accumulation,
        "train_batch_size": micro * cfg.train.accumulation * world_size,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in values.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"{path}: {key} is {ds[key]} but the run config implies {value}; "
                              "set it to \"auto\"")
    for key in ("fp16", "bf16", "torch_autocast"):
        if ds.get(key, {}).get("enabled") not in (None, False, "auto"):
            raise ConfigError(f"{path}: {key} is set by train.precision (bf16 runs under torch autocast "
                              "with fp32 parameters); set it to \"auto\" or remove it")
        ds.pop(key, None)
    # bf16 = autocast with fp32 parameters and master weights (open_clip's amp_bf16), not
    # DeepSpeed's bf16 mode: that casts every parameter to bf16, so the temperature would
    # move in 1.5% jumps and the head's inputs lose the Random Perturbation noise
    # (docs/training.md, "Precision").
    ds["torch_autocast"] = {"enabled": cfg.train.precision == "bf16", "dtype": "bfloat16"}
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    zero = ds.get("zero_optimization", {})
    # "auto": settings that pay on a GPU and cost on CPU (docs/benchmarks.md, train_bench's
    # 1c/2c/3r). contiguous_gradients: ZeRO 1-2 copy every gradient into one buffer as it is
    # reduced, which on a GPU keeps memory from fragmenting and on CPU is one more copy of
    # every gradient per step. reduce_scatter: NCCL's reduce-scatter moves half an
    # all-reduce's bytes; gloo's takes longer than its all-reduce (collective_bench.py), and
    # ZeRO-3 first interleaves every gradient into a new buffer for it, where without it
    # ZeRO-3 all-reduces its contiguous gradient buffer in place.
    for key in ("contiguous_gradients", "reduce_scatter"):
        if zero.get(key) == "auto":
            import torch

            zero[key] = torch.cuda.is_available()
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if cfg.train.grad_clip == 0 and zero.get("stage", 0) in (1, 2) and not offload:
        # Nothing to clip: skip ZeRO's gradient-norm pass over every gradient and the host
        # sync that checks it each step (train/grad_norm is then not logged).
        zero.setdefault("compute_grad_norm", False)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_skips_nonfinite_steps(ds_config: dict) -> bool:
    """Whether DeepSpeed itself skips (and zeroes the gradients of) an optimizer step whose
    gradient norm is not finite, with fp32 parameters as here (0.19.8: stage3.py `step`,
    stage_1_and_2.py `step`): ZeRO-3 always; ZeRO 1-2 when they compute the norm (clipping
    on, or offload: see fill_ds_config). Its check reads the norm on the host, a read it
    makes anyway; the trainer then needs no host read of its own before backward."""
    stage = zero_stage(ds_config)
    return stage == 3 or (stage in (1, 2) and ds_config["zero_optimization"].get("compute_grad_norm", True))


def zero3_init(ds_config: dict):
    """Under ZeRO-3, build the model partitioned from the start (no rank holds all of it).

    The whole model is built inside one `deepspeed.zero.Init`: towers that transformers
    partitions by themselves inside an unpartitioned wrapper break under bf16 (environment.md).
    """
    if zero_stage(ds_config) != 3:
        return nullcontext()
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    compat.import_before_zero_init()
    # Tells transformers' from_pretrained to load weights into partitioned parameters; it
    # holds only a weak reference, so keep this object alive.
    _LIVE_HF_DS_CONFIG[:] = [HfDeepSpeedConfig(ds_config)]
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


_LIVE_HF_DS_CONFIG: list = []


def zero3_leaf_blocks(model) -> int:
    """Makes each tower block (finetune.transformer_blocks) one ZeRO-3 leaf module, before
    `deepspeed.initialize` registers its hooks; returns how many.

    ZeRO-3 hooks every module: on CPU most of a step went into those hooks (issue 21). A leaf
    has one set, and its parameters are gathered together. DeepSpeed (0.19.8) gathers a leaf's
    parameters for backward from hooks on its *positional input tensors that need a gradient*
    (tests/scripts/zero3_leaf_repro.py): transformers calls its blocks with the hidden states
    positional, and a block that trains but whose input needs no gradient (the first block of
    a LoRA tower over frozen embeddings, the first unfrozen one of a last_n tower) gets its
    input marked as needing one by a pre-hook that runs before DeepSpeed's. A tower with no
    block list (a registered kind of another shape) keeps DeepSpeed's per-module hooks."""
    from deepspeed.utils import set_z3_leaf_module

    count = 0
    for tower in (model.image_tower, model.text_tower):
        try:
            blocks = transformer_blocks(tower)[1] if tower is not None else []
        except ValueError:  # no nn.ModuleList in it
            blocks = []
        for block in blocks:
            set_z3_leaf_module(block, True)
            if any(p.requires_grad for p in block.parameters()):
                block.register_forward_pre_hook(compat.leaf_inputs_need_grad)
            count += 1
    return count


def make_accelerator(ds_config: dict, trackers: list[str] = (), project_dir: str | None = None,
                     timeout_s: int = 1800):
    """trackers: Accelerate's tracker names other than TensorBoard (which the run logger
    writes itself), started by the trainer with `init_trackers`. timeout_s: how long a
    collective waits for a peer (engine.collective_timeout)."""
    import torch
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    prepare_deepspeed_ops(on_gpu=torch.cuda.is_available())  # before DeepSpeed's comm backend starts
    timeout = timedelta(seconds=timeout_s)
    compat.set_default_group_timeout(timeout)
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    return Accelerator(deepspeed_plugin=plugin, mixed_precision="no",  # autocast is DeepSpeed's (fill_ds_config)
                       kwargs_handlers=[InitProcessGroupKwargs(backend=backend(), timeout=timeout)],
                       log_with=list(trackers) or None, project_dir=project_dir)
