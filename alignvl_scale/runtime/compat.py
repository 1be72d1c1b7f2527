"""What the dependencies do not promise: every private API this project touches and every
workaround for one of their versions' behaviour, in one place, each with the versions it
was checked on. pyproject.toml pins the ranges the tests ran on; when a release moves one of
these, this is the file to read (the tests of the parts that use each hold it to its contract).

    torch        2.13 here (CPU), 2.11 on the GPU machines
    accelerate   1.15-1.16
    deepspeed    0.19.8 (0.19.7 gives NaN losses under ZeRO-3 + bf16: docs/environment)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from torch import Tensor

# -- torch ----------------------------------------------------------------------------------


def beta_pair_weight(alpha: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """One draw of lambda ~ Beta(alpha, alpha) from `generator`: G1 / (G1 + G2) with Gamma(alpha)
    draws. torch.distributions.Beta takes no generator; `torch._standard_gamma` (private, torch
    2.4-2.13) does."""
    gammas = torch._standard_gamma(torch.full((2,), float(alpha), device=device), generator=generator)
    return gammas[0] / gammas.sum()


def quiet_deepspeed_deprecations() -> None:
    """DeepSpeed 0.19.8's ZeRO gathers with `torch.distributed.all_gather_into_tensor`, which
    torch 2.13 deprecates with a FutureWarning on every ZeRO-1/2/3 run: nothing a user of this
    project can act on. That one warning is silenced; every other stays."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def set_default_group_timeout(timeout: timedelta) -> None:
    """Every process group made from now on waits `timeout` by default, not torch's 30 minutes.
    DeepSpeed makes groups of its own with `new_group()` and no timeout (ZeRO's data-parallel
    clone of the world group): a peer that hung while the others waited there held them for 30
    minutes whatever engine.collective_timeout said. `new_group` reads these module defaults
    at call time (torch.distributed.distributed_c10d, torch 2.4-2.13)."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def extension_build_dir(name: str) -> Path:
    """Where torch's extension loader builds (and locks) op `name`
    (torch.utils.cpp_extension._get_build_directory, private, torch 2.4-2.13)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def tf32_switch() -> tuple[str, object, object]:
    """The attribute of torch.backends.cuda.matmul that picks TF32 for fp32 matmuls, and its
    on / off values: torch >= 2.9 names it fp32_precision ("tf32" / "ieee") and refuses mixing
    it with the older allow_tf32 (True / False)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return "fp32_precision", "tf32", "ieee"
    return "allow_tf32", True, False


def mm_fp32_out(a: Tensor, b: Tensor) -> Tensor | None:
    """a @ b of bf16 operands with fp32 accumulation into an fp32 result on CUDA (torch.mm's
    out_dtype, torch >= 2.8); None where this torch has no such overload."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return None


@contextmanager
def torch_load_replaced(load: Callable[..., object]):
    """Inside, `torch.load` is `load`, process-wide: DeepSpeed's checkpoint engine and its
    zero_to_fp32 / ds_to_universal call torch.load(weights_only=False) themselves, and offer no
    hook (deepspeed 0.19.8). `load` receives the real torch.load as its first argument."""
    real = torch.load
    torch.load = lambda *args, **kwargs: load(real, *args, **kwargs)
    try:
        yield
    finally:
        torch.load = real


# -- accelerate -----------------------------------------------------------------------------


def reset_accelerate_state() -> None:
    """Clear Accelerate's process-wide singletons so that this process can build another
    Accelerator with another DeepSpeed plugin (`ablate` trains many runs in one process).
    AcceleratorState._reset_state and GradientState._reset_state are private (accelerate
    1.0-1.16); without them the second Accelerator raises on the changed plugin."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# -- transformers ---------------------------------------------------------------------------


def enable_activation_checkpointing(model, use_reentrant: bool = False, context_fn=None) -> None:
    """Recompute a transformers model's activations in backward; context_fn: torch.utils.checkpoint's
    (the contexts its forward and its recomputation run in; non-reentrant only). transformers 5.x
    names it `activation_checkpointing_enable` (and warns at the old `gradient_checkpointing_enable`,
    which 4.45-4.x have alone)."""
    kwargs = {"use_reentrant": use_reentrant, **({"context_fn": context_fn} if context_fn else {})}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# -- deepspeed ------------------------------------------------------------------------------


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's real shape, also when zero.Init made it an empty partition (DeepSpeed keeps
    it in the `ds_shape` attribute it sets, 0.19.8)."""
    return getattr(param, "ds_shape", param.shape)


def deepspeed_checkpoint_types() -> list:
    """The only non-tensor types DeepSpeed 0.19 writes into a checkpoint (ZeRO 1-3): what a
    weights-only load must allow, and nothing more."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def ds_to_universal(state_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's universal conversion, in this process (deepspeed.checkpoint.ds_to_universal's
    `main` takes its command line's Namespace; 0.19.8). One worker each, so that every load
    goes through the caller's torch.load; `inject_missing_state`: engines built by Accelerate
    write no universal info (DeepSpeed issue 5430)."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main

    main(Namespace(input_folder=str(state_dir), output_folder=str(out_dir), num_extract_workers=1,
                   num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))


def zero_norm_without_fp64_copies(optimizer) -> bool:
    """ZeRO's gradient norm for clipping (0.19.8 `get_grad_norm_direct`, stages 1-2 and 3)
    copies every gradient (partition) to fp64 and takes its norm there, one tensor at a time:
    11% of a ZeRO-2 step on CPU (docs/benchmarks.md). `l2_norm_all_reduced` gives the same norm
    (within 1e-8 of fp64 on the real towers, `benchmarks/grad_norm_bench.py`) in a quarter to
    a half of the time, then DeepSpeed's one all-reduce over the partition group and its
    non-finite sentinel as before. Installed on a ZeRO optimizer without model, pipeline or
    expert parallelism (whose replicated parameters the original counts once); returns
    whether it was."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if (not isinstance(optimizer, DeepSpeedZeroOptimizer | DeepSpeedZeroOptimizer_Stage3)
            or optimizer.model_parallel_group is not None or getattr(optimizer, "has_moe_layers", False)):
        return False
    original = optimizer.get_grad_norm_direct
    partition_group = getattr(optimizer, "_get_param_partition_group", lambda _: optimizer.dp_process_group)

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0 or not params:
            return original(gradients, params, norm_type)
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        return l2_norm_all_reduced(grads, partition_group(params[0]), optimizer.device)

    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True


def l2_norm_all_reduced(grads: list[Tensor], group, device) -> Tensor:
    """The L2 norm of `grads` over the ranks of `group` as ZeRO returns it (fp32; the -1
    sentinel where not finite). Each tensor's sum of squares in fp32 by torch's cascade sum
    (fp32 `vector_norm` and `_foreach_norm` are off by 1e-4 relative on CPU at these sizes),
    summed over tensors in fp64."""
    import deepspeed.comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    squares = (torch.stack([g.detach().square().sum() for g in grads]).double().sum().float() if grads
               else torch.zeros((), dtype=torch.float32, device=device))
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    total = squares.sqrt()
    mask_nan_or_inf_with_val_inplace(total, device=device)
    return total


@contextmanager
def optimizer_groups_kept(optimizer: torch.optim.Optimizer):
    """Around DeepSpeed's `load_checkpoint`: its ZeRO-3 universal load (0.19.8) gives every
    parameter group the first group's hyperparameters (weight decay on biases, norms, the
    temperature) and one shared Adam `step` tensor, which AdamW then advances once per group
    per step (its bias correction off by the group count). The config's hyperparameters come
    back, and each parameter gets its own step tensor."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    yield
    for group, saved in zip(optimizer.param_groups, hyper, strict=True):
        group.update(saved)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def guard_op_builds(wrap: Callable) -> None:
    """Route every JIT op build of DeepSpeed through `wrap(jit_load)` (OpBuilder.jit_load, an
    internal method, 0.19.8): runtime/ds_ops.py announces builds and clears stale locks."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    if not getattr(OpBuilder.jit_load, "alignvl_guarded", False):
        OpBuilder.jit_load = wrap(OpBuilder.jit_load)


def skip_op(name: str) -> None:
    """Mark a DeepSpeed op incompatible so that it is never built: DeepSpeed reads this cache to
    decide, and "edits to it persist" (deepspeed/ops/__init__.py `__compatible_ops__`, 0.19.8)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[name] = False


def import_before_zero_init() -> None:
    """Modules that fail to import under zero.Init's patched tensor constructors (torch._dynamo,
    which transformers may import lazily inside a tower's construction; deepspeed 0.19.8)."""
    import torch._dynamo  # noqa: F401


def leaf_inputs_need_grad(module: torch.nn.Module, args: tuple):
    """A forward pre-hook for a trainable ZeRO-3 leaf module: DeepSpeed (0.19.8) gathers a
    leaf's parameters for backward from hooks on its positional input tensors that need a
    gradient (tests/scripts/zero3_leaf_repro.py); the first trainable block over frozen
    embeddings gets none, and its backward hangs. Its floating inputs are marked as needing
    one (only when autograd is on)."""
    if not torch.is_grad_enabled():
        return None
    return tuple(a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() and not a.requires_grad
                 else a for a in args)
