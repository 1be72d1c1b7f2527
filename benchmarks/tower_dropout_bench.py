"""What keying a trainable tower's dropout by the sample costs (model/keyed.py): a BERT text
tower's training forward + backward with torch's own dropout (no keys) against the same with
`TowerDraws` (every F.dropout and SDPA dropout drawn from k data streams' generators), side
by side in one run. Medians of --repeats, the cases' order alternating; one thread.

The tower has BERT-base's widths (hidden 768, 12 heads, intermediate 3072, hidden and
attention dropout 0.1) and --layers of its 12 blocks, random weights: a step's cost per block
is what matters, and 12 blocks at base width take minutes per step on this 2-core machine.

    python benchmarks/tower_dropout_bench.py                 # CPU, a few minutes here
    python benchmarks/tower_dropout_bench.py --device cuda --rows 256 --layers 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from alignvl_scale.data.streams import RowKeys
from alignvl_scale.model.keyed import tower_draws


def make_tower(layers: int, device: str, attention: str):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=layers,
                        max_position_embeddings=128, attn_implementation=attention)
    return BertModel(config).to(device).train()


def step_seconds(tower, ids: torch.Tensor, mask: torch.Tensor, streams: int | None, steps: int) -> float:
    """Seconds per forward + backward, over `steps` after one warm-up."""
    def one(index: int) -> None:
        rows = None if streams is None else RowKeys(0, index, 0, streams)
        with tower_draws(rows, 0, "dropout.text_tower"):
            out = tower(input_ids=ids, attention_mask=mask).last_hidden_state
        out.mean().backward()

    one(0)
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for index in range(1, steps + 1):
        one(index)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=16, help="captions in the rank's batch")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per caption (padded to it)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8], help="data streams the rows come from")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tower_dropout_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tower = make_tower(args.layers, args.device, args.attention)
    ids = torch.randint(1000, 20000, (args.rows, args.tokens), device=args.device)
    mask = torch.ones_like(ids)
    cases = {"torch's dropout (no keys)": None, **{f"keyed, {k} streams": k for k in args.streams}}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        order = list(cases) if repeat % 2 == 0 else list(reversed(cases))
        for name in order:
            times[name].append(step_seconds(tower, ids, mask, cases[name], args.steps))
    base = statistics.median(times["torch's dropout (no keys)"])
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"BERT-base widths, {args.layers} layers, {args.attention} attention, {args.rows} x {args.tokens} tokens, "
          f"{args.device}; forward + backward, median of {args.repeats} x {args.steps} steps")
    print(f"{'dropout':<28} {'s / step':>9} {'x torch':>8}")
    for name, seconds in medians.items():
        print(f"{name:<28} {seconds:>9.4f} {seconds / base:>8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"medians": medians, "times": times, "args": vars(args)}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
