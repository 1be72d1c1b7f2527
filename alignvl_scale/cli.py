"""The `alignvl-scale` command: one subcommand per job. Each command imports what it runs when
it runs (torch, DeepSpeed and the trainer take seconds to import), so that the parser and
`--help` stay quick."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from alignvl_scale import __version__
from alignvl_scale.config import DataConfig, EvalConfig, UserError
from alignvl_scale.studies.benchmarks import BENCHMARKS, DEMO_CONFIG, STUDIES, demo_overrides


def _env(_args: argparse.Namespace) -> int:
    """Print the versions and backends that decide how a run will behave."""
    import accelerate
    import deepspeed
    import torch
    import transformers
    import webdataset

    rows = {
        "alignvl-scale": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count(),
        "nccl": torch.distributed.is_nccl_available(),
        "gloo": torch.distributed.is_gloo_available(),
        "deepspeed": deepspeed.__version__,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
        "webdataset": webdataset.__version__,
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    import json
    from collections import Counter

    from alignvl_scale.data.shards import folder_samples, hf_samples, write_shards

    rejects: list[dict] = []
    if args.source == "folder":
        samples = folder_samples(args.captions, args.image_root, args.allow_outside_root, args.image_column or "image",
                                 args.caption_column, args.separator, None if args.strict else rejects)
        total = None
    else:
        samples, total = hf_samples(args.dataset, args.image_column or "image", args.caption_column or "text",
                                    args.split, args.data_dir)
    manifest = write_shards(samples, args.out, args.samples_per_shard, total=total)
    print(f"wrote {manifest['samples']} samples in {len(manifest['shards'])} shards to {args.out}")
    if rejects:
        path = Path(args.rejects or Path(args.out) / "rejects.jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rejects))
        reasons = ", ".join(f"{n} {reason}" for reason, n in Counter(r["reason"] for r in rejects).most_common())
        print(f"skipped {len(rejects)} rows ({reasons}); each with its line and reason in {path}")
    if len(manifest["shards"]) == 1 and manifest["samples"] > 1:
        print(f"WARNING: all {manifest['samples']} samples are in one shard, and a shard is read by one DataLoader "
              "worker on one rank: with more ranks or workers the others get nothing. Write more shards "
              f"(--samples-per-shard {max(1, manifest['samples'] // 16)} makes 16).", file=sys.stderr)
    return 0


def _shards_index(args: argparse.Namespace) -> int:
    from alignvl_scale.data.index import index_shards

    manifest = index_shards(args.spec, args.workers, args.out)
    indexed = manifest["indexed"]
    print(f"indexed {len(manifest['shards'])} shards, {manifest['samples']} samples ({indexed['from_stats_json']} "
          f"counted from *_stats.json, {indexed['read']} by reading them); manifest.json written "
          f"{'to ' + args.out if args.out else 'beside them'}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from alignvl_scale.data.check import check_shards, print_report
    from alignvl_scale.data.samples import DecodeLimits

    bad: list[tuple[str, str, str]] | None = [] if args.list else None
    report = check_shards(args.specs, args.kind, DecodeLimits(), args.samples_per_shard, bad)
    for url, key, detail in bad or []:
        print(f"{url}\t{key or '-'}\t{detail}")
    total = print_report(report, args.json)
    if total.skip_fraction > args.max_skip_fraction:
        print(f"FAIL: skip fraction {total.skip_fraction:.2%} > --max-skip-fraction {args.max_skip_fraction:.2%}",
              file=sys.stderr)
        return 1
    missing = total.skipped.get("missing_samples", 0)
    if missing:
        print(f"{'FAIL' if args.strict else 'WARNING'}: the shards hold {missing} samples fewer than their manifests "
              "say (a cut tar, or a wrong count)", file=sys.stderr)
        return 1 if args.strict else 0
    return 0


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    shards = sub.add_parser("shards", help="write WebDataset tar shards and a manifest, or index shards written "
                            "elsewhere (img2dataset)")
    source = shards.add_subparsers(dest="source", required=True)
    index = source.add_parser("index", help="write manifest.json for shards this project did not write (counts from "
                              "img2dataset's *_stats.json, else by reading each shard), locally or in s3:// or gs://")
    index.add_argument("spec", help="a folder of .tar shards (local, s3:// or gs://), or a brace list of shards in "
                       "one folder (http(s)://host/shards/{00000..00099}.tar)")
    index.add_argument("--workers", type=int, default=8, help="shards read at once (default 8)")
    index.add_argument("--out", help="write manifest.json into this folder instead of beside the shards (an HTTP "
                       "server cannot be written to: copy it there)")
    index.set_defaults(func=_shards_index)
    folder = source.add_parser("folder", help="images in a folder + a CSV, TSV or JSONL of captions")
    folder.add_argument("--captions", required=True, help="caption file: .csv, .tsv (or any with --separator), "
                        "or JSONL rows")
    folder.add_argument("--image-root", help="folder the image paths are relative to (default: the caption file's)")
    folder.add_argument("--allow-outside-root", action="store_true",
                        help="read images outside the image root too (absolute paths, ../, links out)")
    folder.add_argument("--separator", help="column separator of a delimited caption file (default: by suffix, "
                        ".csv ',' and .tsv tab)")
    folder.add_argument("--rejects", help="where the skipped rows go, one JSON line each with its line and reason "
                        "(default: OUT/rejects.jsonl)")
    folder.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    hf = source.add_parser("hf", help="a Hugging Face datasets dataset (save_to_disk folder or local builder)")
    hf.add_argument("--dataset", required=True, help="save_to_disk folder, or a builder such as imagefolder")
    hf.add_argument("--data-dir", help="data_dir for load_dataset builders")
    hf.add_argument("--split", default="train", help="dataset split (default train)")
    for p, image, caption in ((folder, "image", "caption (JSONL: captions or caption)"), (hf, "image", "text")):
        p.add_argument("--image-column", help=f"column of image paths or images (default {image})")
        p.add_argument("--caption-column", help=f"column of captions (default {caption})")
    for p in (folder, hf):
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--samples-per-shard", type=int, default=1000,
                       help="samples per tar shard (default 1000); aim for many more shards than ranks x workers")
        p.set_defaults(func=_shards)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="stream shards through the training decoder; count skips by reason")
    check.add_argument("specs", nargs="+", help="shard folder, manifest.json, brace list or pipe: url")
    check.add_argument("--kind", choices=["image-text", "features"], default="image-text",
                       help="what the shards hold (default image-text)")
    check.add_argument("--samples-per-shard", type=int, help="for shards without a manifest")
    check.add_argument("--max-skip-fraction", type=float, default=DataConfig.max_skip_fraction,
                       help="fail above this fraction of skipped samples (default: training's, "
                       "data.max_skip_fraction)")
    check.add_argument("--json", help="also write the counts here")
    check.add_argument("--strict", action="store_true", help="fail when a shard disagrees with its manifest")
    check.add_argument("--list", action="store_true", help="also name every skipped sample: shard, key, reason")
    check.set_defaults(func=_data_check)


def _export(args: argparse.Namespace) -> int:
    from alignvl_scale.export.exporter import export, export_hf

    if args.push_to_hub and args.format != "hf":
        raise SystemExit("alignvl-scale export: --push-to-hub needs --format hf")
    write = export_hf if args.format == "hf" else export
    out = write(args.checkpoint, args.out, args.trust_checkpoint)
    print(f"exported {args.checkpoint} -> {out}")
    if args.push_to_hub:
        from alignvl_scale.export.hf import push_to_hub

        print(f"uploaded {out} -> {push_to_hub(Path(out), args.push_to_hub, private=not args.public)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from alignvl_scale.evaluation.evaluate import evaluate_specs, evaluate_zero_shot
    from alignvl_scale.evaluation.metrics import DIRECTIONS, RECALL_KS, recall_key
    from alignvl_scale.evaluation.zeroshot import load_zero_shot_set
    from alignvl_scale.export.exporter import load_encoder

    if not args.data and not args.zero_shot:
        raise SystemExit("alignvl-scale eval: give --data (retrieval sets) and/or --zero-shot (image folders)")
    zero_shot = {folder: load_zero_shot_set(folder, args.classes, args.templates) for folder in args.zero_shot}
    encoder = load_encoder(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    sets: dict = {}
    diagrams = (Path(args.reliability), Path(args.checkpoint).name) if args.reliability else None
    results = evaluate_specs(encoder, args.data, args.batch_size, sets, allow_outside=args.allow_outside_paths,
                             diagrams=diagrams)
    for spec, metrics in results.items():
        evalset = sets[spec]
        skipped = dict(evalset.counts.skipped)
        print(f"{spec}: {len(evalset.images)} images, {len(evalset.texts)} captions"
              + (f" (skipped {skipped})" if skipped else ""))
        for direction in DIRECTIONS:
            print(f"  {direction}: " + "  ".join(f"R@{k} {metrics[recall_key(direction, k)]:6.2f}" for k in RECALL_KS)
                  + f"  median rank {metrics[f'{direction}_median_rank']:.0f}")
    for folder, zs in zero_shot.items():
        accuracy = evaluate_zero_shot(encoder, zs, args.batch_size)
        print(f"{folder}: zero-shot over {len(zs.classes)} classes, {len(zs.images)} images, {len(zs.templates)} "
              "templates: " + "  ".join(f"{k} {v:6.2f}" for k, v in accuracy.items()))
        results[f"zeroshot:{folder}"] = accuracy
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _extract(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from alignvl_scale.config import load_config
    from alignvl_scale.runtime.distributed import backend
    from alignvl_scale.training.extract import extract
    from alignvl_scale.training.launch import export_torch_env, launch_env

    cfg = load_config(args.config, args.overrides)
    launch = launch_env()
    if launch.world > 1:  # under torchrun, deepspeed, srun or mpirun
        export_torch_env(launch)
        dist.init_process_group(backend())
    manifest = extract(cfg, args.data, args.out, args.batch_size)
    if manifest is not None:
        print(f"{manifest['samples']} samples -> {args.out} (image dim {manifest['image_dim']}, "
              f"text dim {manifest['text_dim']}, skipped {manifest['skipped']})")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from alignvl_scale.studies.demo import run_demo

    run_demo(args.out or BENCHMARKS[args.benchmark].default_dir, args.config or DEMO_CONFIG, args.overrides,
             args.benchmark, args.source)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from alignvl_scale.studies.ablate import load_study, run_study
    from alignvl_scale.studies.demo import prepare_features

    studies = [load_study(s, args.seeds) for s in args.study or ("sigma", "alpha")]  # every file checked first
    for study in studies:
        overrides = list(args.overrides)
        if study.benchmark:  # a benchmark's data and the demo's towers, features extracted once
            folder = getattr(args, f"{study.benchmark}_dir")
            prepare_features(folder, DEMO_CONFIG, study.benchmark)
            overrides = [*demo_overrides(folder), *overrides]
        run_study(study, overrides, args.out, args.jobs, in_process=not args.separate)
    return 0


TRUST_HELP = ("unpickle a training checkpoint in full (only for files you trust: by default anything beyond tensors "
              "and DeepSpeed's own types is refused, since unpickling can run code)")


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """What is done with a trained model: export and evaluation."""
    export = sub.add_parser("export", help="checkpoint of any ZeRO stage -> fp32 safetensors + config, or a "
                            "transformers folder")
    export.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoints/step_N")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    export.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                        help="safetensors: for load_encoder and eval; hf: a transformers folder that transformers "
                        "alone loads (AutoModel / AutoProcessor / pipeline with trust_remote_code=True), with a model "
                        "card; eval takes both")
    export.add_argument("--push-to-hub", metavar="REPO", help="with --format hf: upload the folder to this Hub "
                        "repository (huggingface_hub; needs a token)")
    export.add_argument("--public", action="store_true", help="with --push-to-hub: a public repository")
    export.set_defaults(func=_export)
    evaluate = sub.add_parser("eval", help="retrieval R@1/5/10 and zero-shot accuracy of an exported model or a "
                              "checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="an export folder (either format) or "
                          "RUN_DIR/checkpoints/step_N")
    evaluate.add_argument("--data", nargs="*", default=[], help="retrieval sets: shard specs or .jsonl files")
    evaluate.add_argument("--zero-shot", nargs="*", default=[], metavar="FOLDER",
                          help="zero-shot classification: image folders with one subfolder per class")
    evaluate.add_argument("--classes", help="zero-shot class list (default: FOLDER/classes.txt, else the subfolders)")
    evaluate.add_argument("--templates", help="zero-shot prompt templates, one per line with {} "
                          "(default: FOLDER/templates.txt, else 'a photo of a {}.')")
    evaluate.add_argument("--batch-size", type=int, default=EvalConfig.batch_size,
                          help="images or captions encoded at once")
    evaluate.add_argument("--json", help="also write the metrics here")
    evaluate.add_argument("--reliability", metavar="DIR",
                          help="also write a reliability diagram per --data set here (SET.png and SET.json)")
    evaluate.add_argument("--allow-outside-paths", action="store_true",
                          help="let a JSONL set name images outside its folder")
    evaluate.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    evaluate.set_defaults(func=_eval)


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """Training, and the pipelines built on it: extraction, the demo, the studies."""
    # `train` hands its arguments to alignvl_scale.training.main as they are (see main).
    sub.add_parser("train", help="train in one process: --config FILE [--resume latest] [key=value ...] "
                   "(under torchrun or deepspeed use launchers/train.py; every key and its meaning: "
                   "`alignvl-scale config show --defaults`)", add_help=False)
    extract = sub.add_parser("extract", help="tower outputs -> feature shards (run under torchrun for many ranks)")
    extract.add_argument("--config", required=True, help="run YAML naming the towers")
    extract.add_argument("--data", required=True, nargs="+", help="image-text shard specs")
    extract.add_argument("--out", required=True, help="output folder of the feature shards")
    extract.add_argument("--batch-size", type=int, default=64, help="images encoded at once per rank")
    extract.add_argument("overrides", nargs="*", help="section.key=value")
    extract.set_defaults(func=_extract)
    demo = sub.add_parser("demo", help="offline end to end on a benchmark (emoji, or Openclipart from Debian): "
                          "data, extract, train, eval, zero-shot, export")
    demo.add_argument("--benchmark", choices=list(BENCHMARKS), default="emoji",
                      help="emoji (PyPI packages) or openclipart (Debian: apt-get install openclipart-svg "
                      "librsvg2-bin); default emoji")
    demo.add_argument("--source", type=Path, help="openclipart: the SVG folder (default /usr/share/openclipart/svg)")
    demo.add_argument("--out", type=Path, help="where data, features and the run go (default: " + ", ".join(
                      f"{b.default_dir} for {name}" for name, b in BENCHMARKS.items()) + ")")
    demo.add_argument("--config", type=Path, help="default: configs/demo.yaml")
    demo.add_argument("overrides", nargs="*", help="section.key=value")
    demo.set_defaults(func=_demo)
    ablate = sub.add_parser("ablate", help="studies of sigma, alpha, mixup, caption noise, training fraction, the "
                            "objective: several paired seeds per setting (alignvl_scale/studies/ablate.py)")
    ablate.add_argument("--study", action="append", help="a study YAML, or a shipped one by name (configs/studies/: "
                        f"{', '.join(sorted(p.stem for p in STUDIES.glob('*.yaml')))}); repeatable; default: sigma "
                        "and alpha")
    ablate.add_argument("--out", type=Path, default=Path("runs/ablate"), help="runs, and per study results.csv/md "
                        "and its plot")
    ablate.add_argument("--seeds", type=int, help="seeds per setting (default: the study's)")
    ablate.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads)")
    for name, bench in BENCHMARKS.items():  # the emoji benchmark's folder is the demo's: --demo-dir too
        flags = [f"--{name}-dir", *(["--demo-dir"] if name == "emoji" else [])]
        ablate.add_argument(*flags, dest=f"{name}_dir", type=Path, default=bench.default_dir,
                            help=f"where the {name} benchmark's data lives (studies with benchmark: {name})")
    ablate.add_argument("--separate", action="store_true", help="one `alignvl-scale train` process per run "
                        "(default: --jobs worker processes that each train run after run; the same numbers)")
    ablate.add_argument("overrides", nargs="*", help="section.key=value for every run")
    ablate.set_defaults(func=_ablate)


def _config_show(args: argparse.Namespace) -> int:
    from alignvl_scale.config import RunConfig, annotated_yaml, load_config

    if args.defaults:
        cfg = RunConfig()
    else:
        if args.config is None:
            raise SystemExit("alignvl-scale config show: give --config FILE (with key=value overrides) or --defaults")
        cfg = load_config(args.config, args.overrides)
    print(annotated_yaml(cfg))
    return 0


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="show a resolved run config with the meaning of every key")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config (YAML that loads back), each key commented")
    show.add_argument("--config", type=Path, help="run YAML")
    show.add_argument("--defaults", action="store_true", help="every key at its default instead")
    show.add_argument("overrides", nargs="*", help="section.key=value")
    show.set_defaults(func=_config_show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignvl-scale", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions and distributed backends").set_defaults(func=_env)
    _add_data_commands(sub)
    _add_run_commands(sub)
    _add_model_commands(sub)
    _add_config_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from alignvl_scale.training.arguments import parse_args

        parse_args(argv[1:], prog="alignvl-scale train")  # --help and usage errors before the trainer's imports
        from alignvl_scale.training.main import main as train_main

        train_main(argv[1:], prog="alignvl-scale train")
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:  # the user's input: one line, no traceback
        print(f"alignvl-scale {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
