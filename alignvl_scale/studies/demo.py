"""The offline benchmarks' pipeline: `alignvl-scale demo [--benchmark openclipart]` builds the
data (studies/benchmarks.py), extracts features, trains the adapters, evaluates against the
untrained model, exports, prints zero-shot accuracy, and where the TensorBoard logs and the
model are. Towers: EfficientNet-Lite0 (images) and all-MiniLM-L6-v2 (text), both frozen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import ModuleType

from alignvl_scale.checkpoint.rundir import METRICS, TENSORBOARD, checkpoint_dir
from alignvl_scale.config import load_config
from alignvl_scale.data.shards import MANIFEST
from alignvl_scale.evaluation.evaluate import evaluate_specs, evaluate_zero_shot
from alignvl_scale.evaluation.metrics import DIRECTIONS, RECALL_KS, recall_key
from alignvl_scale.evaluation.zeroshot import load_zero_shot_set
from alignvl_scale.export.exporter import export, load_encoder
from alignvl_scale.studies.benchmarks import BENCHMARKS, DEMO_CONFIG, demo_overrides
from alignvl_scale.training.extract import extract
from alignvl_scale.training.preflight import preflight
from alignvl_scale.training.trainer import Trainer


def prepare_features(out: Path, config: Path = DEMO_CONFIG, benchmark: str = "emoji", source: Path | None = None
                     ) -> None:
    """The benchmark's data and its features (each step skipped when already done)."""
    bench = BENCHMARKS[benchmark].load()
    counts = bench.build(out / "shards", source)
    print(f"[demo] {benchmark} data: {counts['train']} train / {counts['test']} held-out {bench.UNIT} in "
          f"{out / 'shards'}")
    # The towers read images and captions here: an image-text view of the run's config (a
    # features config would look for the feature manifest this step writes).
    cfg = load_config(config, [*demo_overrides(out), "data.kind=image-text"])
    for split in ("train", "test"):
        if not (out / "features" / split / MANIFEST).exists():
            extract(cfg, [str(out / "shards" / split)], out / "features" / split)
    print(f"[demo] features in {out / 'features'}")


def run_demo(out: str | Path, config: Path = DEMO_CONFIG, overrides: list[str] = (), benchmark: str = "emoji",
             source: Path | None = None) -> dict:
    start = time.perf_counter()
    out, bench = Path(out), BENCHMARKS[benchmark].load()
    prepare_features(out, config, benchmark, source)
    cfg = load_config(config, [*demo_overrides(out), "eval.at_start=true", *overrides])
    # The demo trains anew each time; one process: the trainer sets up a process group of one.
    trainer = Trainer(preflight(cfg, overwrite=True))
    summary = trainer.run()
    trainer.close()
    run_dir = Path(cfg.run_dir)
    baseline = {json.loads(line)["step"]: json.loads(line) for line in
                (run_dir / METRICS).read_text().splitlines()}[0]
    exported = export(checkpoint_dir(run_dir, summary["step"]), out / "export")
    # The exported model end to end (towers + adapters) on the held-out raw images and captions.
    raw = evaluate_specs(load_encoder(exported), [str(out / "shards" / "test")], batch_size=64)
    raw = next(iter(raw.values()))
    print(f"\n[demo] held-out retrieval ({summary['eval_images']} {bench.UNIT}, chance R@1 "
          f"{100 / summary['eval_images']:.2f}%), R@K in %:")
    print(f"{'':<24} {'i2t R@1':>8} {'R@5':>6} {'R@10':>6} {'t2i R@1':>8} {'R@5':>6} {'R@10':>6}")
    rows = {"untrained": {k.split("/")[-1]: v for k, v in baseline.items() if k.startswith("eval/")},
            "trained": {k.split("/")[-1]: v for k, v in summary["eval"].items()},
            "exported, from images": raw}
    for name, m in rows.items():
        print(f"{name:<24} " + " ".join(f"{m[recall_key(d, k)]:>{8 if k == 1 else 6}.1f}"
                                        for d in DIRECTIONS for k in RECALL_KS))
    zero_shot = zero_shot_table(load_encoder(exported), out / "shards", bench)
    print(f"\n[demo] TensorBoard: tensorboard --logdir {run_dir / TENSORBOARD}")
    print(f"[demo] exported model: {exported}  (alignvl-scale eval --checkpoint {exported} --data ...)")
    print(f"[demo] done in {time.perf_counter() - start:.0f} s")
    return {"untrained": rows["untrained"], "trained": rows["trained"], "exported": raw, "zero_shot": zero_shot}


def zero_shot_table(encoder, shards: Path, bench: ModuleType) -> dict[str, dict[str, float]]:
    """Zero-shot classification of the held-out images by each of the benchmark's tasks
    (the exported model, from images), printed with chance levels."""
    print(f"\n[demo] zero-shot classification of the held-out {bench.UNIT} (exported model, from images), "
          "accuracy in %:")
    results = {}
    for task in bench.ZERO_SHOT_TASKS:
        zs = load_zero_shot_set(shards / f"zeroshot_{task}")
        results[task] = evaluate_zero_shot(encoder, zs, batch_size=64)
        print(f"{task:<10} {len(zs.classes):>3} classes, {len(zs.images)} {bench.UNIT}: "
              + "  ".join(f"{k} {v:5.1f} (chance {100 * int(k[3:]) / len(zs.classes):.1f})"
                          for k, v in results[task].items()))
    return results
