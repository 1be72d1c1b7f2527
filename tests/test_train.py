"""Real 2-process training runs on CPU (gloo) under torchrun, deepspeed and accelerate
launch, ZeRO 1/2/3, with tiny random-init HF towers (ViT + BERT, ViT + Llama), with the
InfoNCE and the sigmoid objective."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    BIN,
    ROOT,
    assert_lr_follows_the_schedule,
    env,
    launch_cmd,
    logged,
    make_tiny_towers,
    png_bytes,
    run,
    write_image_shards,
)

from alignvl_scale.data.synthetic import write_feature_shards
from alignvl_scale.runtime.distributed import free_port

REQUIRED_SCALARS = {
    "train/loss", "train/lr", "train/logit_scale", "train/i2t_accuracy", "train/t2i_accuracy", "train/grad_norm",
    "perf/samples_per_s", "perf/samples_per_s_per_rank", "perf/data_wait_fraction", "perf/tflops_per_rank",
    "perf/tflop_per_step_per_rank", "perf/peak_memory_gib", "data/skipped_undecodable_image",
    "eval/i2t_R@1", "eval/i2t_R@5", "eval/i2t_R@10", "eval/t2i_R@1", "eval/t2i_R@5", "eval/t2i_R@10",
    "eval/zeroshot/zs/top1",  # 3 classes: no top5
    "eval/i2t_ece", "eval/t2i_ece", "eval/i2t_nll", "eval/t2i_confidence", "data/noisy_captions",
}


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    towers = make_tiny_towers(root)
    write_image_shards(root / "train", [16] * 4)
    write_image_shards(root / "eval", [16])
    for label, name in enumerate(("red_fox", "blue_jay", "grey_wolf")):  # a zero-shot set: 3 classes x 4 images
        (root / "zs" / name).mkdir(parents=True)
        for i in range(4):
            (root / "zs" / name / f"{i}.png").write_bytes(png_bytes(1000 + 10 * label + i))
    return root, towers


def write_config(assets, run_dir: Path, text_tower: str = "bert", **sections) -> Path:
    root, towers = assets
    cfg = {
        "model": {"image_tower": {"name": towers["vit"], "pooling": "mean"},
                  "text_tower": {"name": towers[text_tower], "max_length": 16},
                  "embed_dim": 16, "adapter_depth": 1, "noise_sigma": 0.0},
        "data": {"train": [str(root / "train")], "batch_size": 4, "workers": 1, "image_size": 16},
        # A decaying schedule: a constant one hid a schedule running world_size times too fast.
        "train": {"steps": 30, "lr": 0.003, "warmup_steps": 3, "min_lr_ratio": 0.1, "log_every": 2},
        "eval": {"data": [str(root / "eval")], "zero_shot": [str(root / "zs")], "batch_size": 8},
        "run_dir": str(run_dir),
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tensorboard_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def assert_hf_export_equals_the_encoder(checkpoint: Path, hf_dir: Path, encoder, image: Path) -> None:
    """`export --format hf` of a trained checkpoint: transformers loads it (here with this package
    imported, which registers the same classes; without it, tests/test_hf.py) and gives the same
    embeddings as `load_encoder`, from its own image processor too (the towers have none: the
    trained transform is saved as one), on an image that is not square, and the same logits
    (with the bias of a sigmoid objective); the folder carries its code and names no local path."""
    subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "export", "--checkpoint", str(checkpoint), "--out",
                    str(hf_dir), "--format", "hf"], check=True, cwd=ROOT, env=env(), capture_output=True)
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    import alignvl_scale.export.hf  # noqa: F401  (registers the alignvl model type)

    assert "AutoModel" in json.loads((hf_dir / "config.json").read_text())["auto_map"]
    assert (hf_dir / "modeling_alignvl.py").is_file()
    model = AutoModel.from_pretrained(hf_dir).eval()
    tokens = AutoTokenizer.from_pretrained(hf_dir)(["caption 3", "a cat"], padding="max_length", max_length=16,
                                                   truncation=True, return_tensors="pt")
    wide = image.with_name("wide.png")
    Image.open(image).convert("RGB").resize((37, 23)).save(wide)
    processor = AutoImageProcessor.from_pretrained(hf_dir)
    with torch.no_grad():
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        pixels = processor(images=Image.open(wide).convert("RGB"), return_tensors="pt")["pixel_values"]
        picture = model.get_image_features(pixel_values=pixels)
    torch.testing.assert_close(pixels[0], encoder.preprocessing.image_transform(Image.open(wide).convert("RGB")))
    torch.testing.assert_close(text, encoder.encode_texts(["caption 3", "a cat"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(picture, encoder.encode_images(wide), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        logits = model(pixel_values=pixels, **tokens)["logits_per_image"]
    calibration = encoder.calibration()
    want = calibration.scale * encoder.encode_images(wide) @ encoder.encode_texts(["caption 3", "a cat"]).T
    torch.testing.assert_close(logits, want + calibration.bias, rtol=1e-4, atol=1e-4)
    card = (hf_dir / "README.md").read_text()
    assert "## Final evaluation" in card and "i2t_R@1" in card and "## Run config" in card
    for file in [hf_dir / "README.md", *hf_dir.glob("*.json")]:  # run dir, data and towers are in pytest's folders
        text = file.read_text()
        assert "pytest-of-" not in text, (file.name, [line for line in text.splitlines() if "pytest-of-" in line][:3])


def export_and_eval(run_dir: Path, tmp_path: Path, eval_data: Path, zero_shot: Path | None = None,
                    hf: bool = True) -> dict:
    """`alignvl-scale export` of the run's latest checkpoint, then `alignvl-scale eval` on it."""
    export_dir = tmp_path / "export"
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    cli = [sys.executable, "-m", "alignvl_scale.cli"]
    subprocess.run([*cli, "export", "--checkpoint", str(checkpoint), "--out", str(export_dir)], check=True, cwd=ROOT,
                   env=env(), capture_output=True)
    assert (export_dir / "model.safetensors").exists() and not list(export_dir.rglob("*.pt"))
    zero_shot_args = ["--zero-shot", str(zero_shot)] if zero_shot else []
    proc = subprocess.run([*cli, "eval", "--checkpoint", str(export_dir), "--data", str(eval_data), *zero_shot_args,
                           "--json", str(tmp_path / "eval.json"), "--reliability", str(tmp_path / "reliability")],
                          check=True, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert f"{eval_data}: 16 images, 16 captions" in proc.stdout
    if zero_shot:
        assert f"{zero_shot}: zero-shot over 3 classes, 12 images, 1 templates" in proc.stdout
    # The Python API: one caption is one caption (not one per character); images by path.
    from alignvl_scale import load_encoder

    encoder = load_encoder(export_dir)
    one = encoder.encode_texts("a cat")
    assert one.shape[0] == 1 and torch.equal(one, encoder.encode_texts(["a cat"]))
    # The training checkpoint itself loads whole too (its frozen towers: ZeRO-1 keeps them only
    # in its module state) and encodes as the export does.
    assert torch.equal(load_encoder(checkpoint).encode_texts("a cat"), one)
    (tmp_path / "cat.png").write_bytes(png_bytes(7))
    assert encoder.encode_images(tmp_path / "cat.png").shape == one.shape
    if hf:
        assert_hf_export_equals_the_encoder(checkpoint, tmp_path / "hf", encoder, tmp_path / "cat.png")
    results = json.loads((tmp_path / "eval.json").read_text())
    diagram = json.loads((tmp_path / "reliability" / f"{eval_data.stem}.json").read_text())
    assert diagram["i2t"]["ece_percent"] == pytest.approx(results[str(eval_data)]["i2t_ece"], rel=1e-9)
    assert (tmp_path / "reliability" / f"{eval_data.stem}.png").exists()
    zero_shot_results = results.get(f"zeroshot:{zero_shot}", {})
    return {**results[str(eval_data)], **{f"zeroshot_{k}": v for k, v in zero_shot_results.items()}}


GRID = [(launcher, stage) for launcher in ("torchrun", "deepspeed", "accelerate") for stage in (1, 2, 3)]
DEFAULT = {("torchrun", 1), ("deepspeed", 2)}  # accelerate launch: tests/test_signals.py; ZeRO-3: test_cluster.py
SIGLIP = {("deepspeed", 2), ("accelerate", 3), ("torchrun", 2)}  # each objective under every stage and launcher


@pytest.mark.parametrize("launcher,stage", [
    pytest.param(launcher, stage, marks=() if (launcher, stage) in DEFAULT else pytest.mark.slow)
    for launcher, stage in GRID])
def test_launcher_and_zero_stage(assets, tmp_path, launcher, stage):
    text_tower, precision = ("llama", "bf16") if stage == 2 else ("bert", "fp32")
    objective = "siglip" if (launcher, stage) in SIGLIP else "infonce"
    run_dir = tmp_path / "run"
    config = write_config(assets, run_dir, text_tower, train={"precision": precision},
                          loss={"objective": objective, "smoothing": 0.1})
    out = run(launch_cmd(launcher, stage, config), run_dir)
    assert f"ZeRO stage {stage}" in out.stdout
    assert "all_gather_into_tensor` is deprecated" not in out.stderr  # DeepSpeed's, every run (compat.py)
    if objective == "siglip":  # the bias is learned and logged beside the temperature
        bias, scale = logged(run_dir, "train/logit_bias"), logged(run_dir, "train/logit_scale")
        assert bias[2] == pytest.approx(-10.0, abs=0.1) and bias[30] > bias[2] + 0.01, bias
        assert scale[2] == pytest.approx(10.0, rel=0.01) and scale[30] != scale[2]
        assert {"train/logit_bias", "train/logit_scale"} <= tensorboard_tags(run_dir)
    else:
        assert "train/logit_bias" not in tensorboard_tags(run_dir)

    losses = list(logged(run_dir, "train/loss").values())
    assert len(losses) == 15
    assert_lr_follows_the_schedule(run_dir)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses  # it learns
    assert logged(run_dir, "train/contrastive_batch")[30] == 8
    assert REQUIRED_SCALARS <= tensorboard_tags(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_images"] == 16  # the retrieval set's (not the zero-shot set's too)
    diagram = json.loads((run_dir / "reliability" / "eval.json").read_text())  # the final evaluation's, rank 0's
    assert diagram["t2i"]["ece_percent"] == pytest.approx(summary["eval"]["eval/t2i_ece"], rel=1e-9)

    # Export this stage's checkpoint; the exported model reproduces the run's eval numbers.
    # The HF-format export on the Llama/bf16 cell (ViT + BERT: test_demo's export).
    exported = export_and_eval(run_dir, tmp_path, assets[0] / "eval", assets[0] / "zs",
                               hf=(launcher, stage) == ("deepspeed", 2))
    tolerance = 1e-9 if precision == "fp32" else 15.0  # bf16 training vs fp32 inference may swap near-ties
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"):
        assert exported[key] == pytest.approx(summary["eval"][f"eval/{key}"], abs=tolerance), key
    if precision == "fp32":  # calibration reads the learned scale (and bias): both survive the export
        for key in ("i2t_nll", "t2i_nll", "i2t_confidence"):
            assert exported[key] == pytest.approx(summary["eval"][f"eval/{key}"], rel=1e-4), key
    assert exported["zeroshot_top1"] == pytest.approx(summary["eval"]["eval/zeroshot/zs/top1"], abs=tolerance)


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
    ("loss.smoothing=1.5", "loss.smoothing: must be in [0, 1), got 1.5"),
    ("data.batchsize=4", "data.batchsize: unknown key"),
    ("train.accumulation=0", "train.accumulation: must be >= 1, got 0"),
    ("train.precision=fp16", "train.precision: must be fp32 or bf16"),
    ("engine.ds_config=nope.json", "engine.ds_config: must be an existing DeepSpeed JSON file"),
])
def test_bad_config_fails_before_any_process_group(assets, tmp_path, override, message):
    config = write_config(assets, tmp_path / "run")
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           str(ROOT / "launchers/train.py"), "--config", str(config), override],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "init_process_group" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage,clip", [(1, 0.0), (2, 1.0)])
def test_non_finite_losses_are_skipped_then_stop_the_run(assets, tmp_path, stage, clip):
    """Without clipping the trainer reads the loss on the host and skips before backward;
    with it, DeepSpeed skips the step on its non-finite gradient norm and the trainer counts it."""
    run_dir = tmp_path / "run"
    config = write_config(assets, run_dir, train={"lr": 1e30, "grad_clip": clip, "max_bad_steps": 3},
                          eval={"data": []})
    proc = subprocess.run(launch_cmd("torchrun", stage, config), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "non-finite loss or gradients, step skipped" in proc.stdout
    assert "3 non-finite steps in a row" in proc.stdout + proc.stderr


# All slow: the schedule through 3 ranks is also held by the resize test (tests/test_cluster.py) and on 2
# ranks by every launcher cell and the kill test (assert_lr_follows_the_schedule).
@pytest.mark.parametrize("ranks", [pytest.param(n, marks=pytest.mark.slow) for n in (1, 2, 3)])
def test_learning_rate_schedule_is_one_step_per_optimizer_step_on_any_number_of_ranks(tmp_path, ranks):
    """Warmup + cosine on 1, 2 and 3 ranks (cached features: no towers, fast). Through
    `accelerate prepare`, a scheduler stepped world_size times per step reached its floor
    after 1/world of the run."""
    write_feature_shards(tmp_path / "features", 6 * 32, shards=6)
    run_dir = tmp_path / "run"
    config = run_dir.parent / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"embed_dim": 16, "adapter": "linear", "noise_sigma": 0.01},
        "data": {"kind": "features", "train": [str(tmp_path / "features")], "batch_size": 8, "workers": 1},
        "train": {"steps": 16, "lr": 0.01, "warmup_steps": 4, "min_lr_ratio": 0.0, "log_every": 1},
        "run_dir": str(run_dir)}))
    run(launch_cmd("torchrun", 1, config, ranks=ranks), run_dir)
    assert_lr_follows_the_schedule(run_dir)
    lrs = logged(run_dir, "train/lr")
    assert lrs[4] == pytest.approx(0.01) and lrs[11] == pytest.approx(0.005)  # mid-cosine, not at its floor


@pytest.mark.slow
def test_bf16_logit_scale_and_loss_follow_the_fp32_run(assets, tmp_path):
    """bf16 (autocast towers, fp32 head and temperature) tracks fp32 at every step while
    the temperature moves by more than 5%. With bf16 parameters the scale moved in ~1.5%
    jumps (bf16 spacing of log 14.3) and missed by up to 0.8%."""
    curves = {}
    for precision in ("fp32", "bf16"):
        run_dir = tmp_path / precision
        config = write_config(assets, run_dir, model={"noise_sigma": 0.01},
                              train={"precision": precision, "steps": 40, "lr": 0.005, "log_every": 1},
                              loss={"smoothing": 0.5}, eval={"data": []})
        run(launch_cmd("torchrun", 2, config), run_dir)
        curves[precision] = (logged(run_dir, "train/logit_scale"), logged(run_dir, "train/loss"))
    (scale32, loss32), (scale16, loss16) = curves["fp32"], curves["bf16"]
    assert abs(scale32[40] / scale32[1] - 1) > 0.05, scale32
    for step in scale32:
        assert scale16[step] == pytest.approx(scale32[step], rel=5e-3), step
        assert loss16[step] == pytest.approx(loss32[step], rel=2e-2), step


def test_post_ln_tower_from_random_weights_at_a_high_lr_is_warned_about(assets):
    from alignvl_scale.config import DataConfig, TowerConfig
    from alignvl_scale.model.towers import build_tower, tower_warnings

    towers = assets[1]
    data = DataConfig(image_size=16)
    bert = build_tower(TowerConfig(name=towers["bert"], init="random", trainable=True), "text", data)
    assert "post-LN encoder (bert)" in tower_warnings(bert, "text", 5e-4)[0]
    assert tower_warnings(bert, "text", 1e-4) == []  # a rate such towers learn at
    llama = build_tower(TowerConfig(name=towers["llama"], init="random", trainable=True), "text", data)
    assert tower_warnings(llama, "text", 5e-4) == []  # pre-norm
    pretrained = build_tower(TowerConfig(name=towers["bert"], trainable=True), "text", data)
    assert tower_warnings(pretrained, "text", 5e-4) == []


def test_tiny_towers_are_the_same_every_time(tmp_path):
    """Unseeded towers made the margins of the "it learns" checks change from run to run."""
    first, second = make_tiny_towers(tmp_path / "a"), make_tiny_towers(tmp_path / "b")
    for name in first:
        a, b = (Path(p, "model.safetensors").read_bytes() for p in (first[name], second[name]))
        assert a == b, name


def test_zero3_builds_only_parameters_inside_zero_init(assets, tmp_path):
    """ZeRO-3 on a GPU died at its first batch: the image transform's mean/std were made
    inside zero.Init (so on cuda:0) and a DataLoader worker mixed them with CPU pixels.
    tests/scripts/zero3_scope.py records every tensor created inside zero.Init and checks
    the decoder's, then trains through the real reader with 2 workers."""
    run_dir = tmp_path / "run"
    config = write_config(assets, run_dir, data={"workers": 2}, train={"steps": 2, "log_every": 1},
                          eval={"data": []})
    proc = subprocess.run([sys.executable, str(ROOT / "tests/scripts/zero3_scope.py"), "--config", str(config),
                           "engine.ds_config=ds_configs/zero3.json"], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert "ZERO3-SCOPE-OK" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0 and len(logged(run_dir, "train/loss")) == 2, proc.stderr[-3000:]


@pytest.mark.slow
def test_gpu_smoke_grid_runs_on_cpu(tmp_path):
    """benchmarks/gpu_smoke.py, one cell of its grid plus export and eval, on 2 CPU ranks."""
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_smoke.py"), "--ranks", "2", "--steps", "2",
                           "--launchers", "torchrun", "--ds-configs", "zero3", "--out", str(out)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert [c["ok"] for c in result["cells"]] == [True] and result["export_eval"]["eval"]
