"""Feature extraction -> cached-feature training -> eval, the ablation command, and the
demo's data builder."""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BIN, ROOT, env, logged, run
from test_train import export_and_eval

from alignvl_scale.config import ConfigError
from alignvl_scale.data.evalsets import load_retrieval_set
from alignvl_scale.data.synthetic import make_tiny_towers, write_feature_shards, write_image_shards
from alignvl_scale.runtime.distributed import free_port
from alignvl_scale.studies.ablate import (
    METRICS,
    Study,
    check_runs,
    feature_rms,
    load_study,
    markdown_tables,
    paired_interval,
    run_study,
    summarize,
    t_quantile_975,
)
from alignvl_scale.studies.emoji import build_demo_data, emoji_entries, is_test

# Documented in docs/demo.md; they change only with the emoji package's data.
DEMO_COUNTS = {"train": 1522, "test": 392, "not_in_font": 9, "zeroshot_group_classes": 9,
               "zeroshot_subgroup_classes": 86}


def test_demo_data_builder_yields_its_documented_counts(tmp_path):
    counts = build_demo_data(tmp_path)
    assert counts == DEMO_COUNTS
    manifest = json.loads((tmp_path / "test" / "manifest.json").read_text())
    assert manifest["samples"] == DEMO_COUNTS["test"] and manifest["kind"] == "image-text"
    entries = dict(emoji_entries())
    assert entries["❤️"] == ["red heart", "heart"] and entries["😀"][0] == "grinning face"
    test_share = sum(map(is_test, entries)) / len(entries)
    assert 0.15 < test_share < 0.25  # split by emoji, about TEST_FRACTION held out
    assert build_demo_data(tmp_path) == {"train": 1522, "test": 392}  # present: not built again
    from alignvl_scale.evaluation.zeroshot import load_zero_shot_set
    group = load_zero_shot_set(tmp_path / "zeroshot_group")
    assert "smileys and emotion" in group.classes and len(group.images) == 390  # held-out emoji with a group
    assert group.templates == ["an emoji of {}.", "a {} emoji."]


def feature_config(tmp_path: Path, train: Path, test: Path) -> Path:
    path = tmp_path / "features.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"embed_dim": 16, "adapter": "linear", "noise_sigma": 0.01},
        "data": {"kind": "features", "train": [str(train)], "batch_size": 32, "workers": 0},
        "train": {"steps": 40, "lr": 0.01, "log_every": 10},
        "eval": {"data": [str(test)], "batch_size": 64}}))
    return path


def test_ablate_study_runs_paired_seeds_and_writes_every_file(tmp_path, capsys):
    """A study over caption noise and sigma at half the training set, two runs at a time: the
    baseline at the setting's caption noise is added as its reference (compare_within), the
    corrupted fraction reaches the summary, and a rerun reuses every run."""
    write_feature_shards(tmp_path / "train", 256)
    write_feature_shards(tmp_path / "test", 64, seed=1, shards=1)
    feature_config(tmp_path, tmp_path / "train", tmp_path / "test")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "config": "features.yaml", "seeds": 2, "overrides": ["train.steps=12"],
        "baseline": {"sigma": 0, "alpha": 0, "mixup": "fusemix", "train_fraction": 0.5},
        "grid": {"sigma": [0.05], "caption_noise": [0.25]}, "compare_within": ["caption_noise"]}))
    study = load_study(tmp_path / "study.yaml")
    assert [s.name(study.baseline) for s in study.settings()] == [
        "baseline", "caption_noise=0.25", "sigma=0.05, caption_noise=0.25"]  # the reference at 0.25 added
    summary = run_study(study, [], tmp_path / "ablate", jobs=2)
    shown = capsys.readouterr()
    assert "ablate tiny" in shown.err and "6/6" in shown.err  # the runs' bar (with the running runs' steps)
    assert "[ablate] tiny 6/6 " in shown.out
    out = tmp_path / "ablate" / "tiny"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 6 and set(METRICS) <= set(rows[0])
    for row in rows:
        noisy = int(row["noisy_captions"]) / int(row["good_samples"])
        assert (0.15 < noisy < 0.35) if float(row["caption_noise"]) else noisy == 0
    assert [s["reference"] for s in summary] == [None, None, "caption_noise=0.25"]
    report = (out / "results.md").read_text()
    assert "Paired difference to the baseline at the same caption_noise" in report
    assert "(rel " in report and "Training feature RMS" in report  # sigma shown in both units
    assert (out / "paired_differences.png").stat().st_size > 1000
    for setting in study.settings():  # a reliability diagram per setting: both seeds' 64 queries a direction
        diagram = json.loads((out / "reliability" / f"{setting.slug()}.json").read_text())
        assert diagram["i2t"]["queries"] == 2 * 64 and (out / "reliability" / f"{setting.slug()}.png").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    from alignvl_scale.studies.ablate import AXES

    run_dirs = sorted((tmp_path / "ablate" / "runs").iterdir())
    assert len(run_dirs) == 6
    for run_dir in run_dirs:  # one TensorBoard hparams entry per run, calibration among the eval scalars
        events = EventAccumulator(str(run_dir / "tb"))
        events.Reload()
        hparams = events.PluginTagToContent("hparams")
        assert "_hparams_/experiment" in hparams
        start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
        assert set(AXES.values()) <= set(start.hparams)  # every study axis, noise_mode included
        assert {"eval/i2t_ece", "eval/t2i_nll", "eval/i2t_confidence"} <= set(events.Tags()["scalars"])
        summary = json.loads((run_dir / "summary.json").read_text())
        diagram = json.loads((run_dir / "reliability" / "test.json").read_text())  # the final evaluation's
        assert diagram["t2i"]["ece_percent"] == pytest.approx(summary["eval"]["eval/t2i_ece"], rel=1e-9)
    before = (out / "results.csv").read_text()  # a rerun finds every summary: nothing runs again
    run_study(study, [], tmp_path / "ablate")
    assert (out / "results.csv").read_text() == before


@pytest.mark.slow
def test_in_process_and_separate_runs_give_the_same_metrics(tmp_path):
    """`ablate` trains a study's cells one after another in a worker process; launched as
    separate `alignvl-scale train` processes, the same cells give the same numbers to the
    last bit, so nothing of one run (RNG streams, Accelerate's or DeepSpeed's state, the
    process group, the run_dir lock) leaks into the next. Noise, smoothing, dropout and
    mixup on, warmup then a cosine decay."""
    write_feature_shards(tmp_path / "train", 256)
    write_feature_shards(tmp_path / "test", 64, seed=1, shards=1)
    feature_config(tmp_path, tmp_path / "train", tmp_path / "test")
    study = Study("same", tmp_path / "features.yaml", ["train.steps=10", "train.warmup_steps=3", "model.dropout=0.2"],
                  seeds=2, base={"sigma": 0.05, "mixup": "fusemix"}, grid={"alpha": [0.2]})
    in_process = run_study(study, [], tmp_path / "in_process", jobs=1)  # one worker: 4 runs back to back
    separate = run_study(study, [], tmp_path / "separate", jobs=1, in_process=False)
    rows = [list(csv.DictReader((tmp_path / out / "same" / "results.csv").open())) for out in ("in_process",
                                                                                              "separate")]
    assert [[r[m] for m in ("setting", "seed", *METRICS)] for r in rows[0]] == \
        [[r[m] for m in ("setting", "seed", *METRICS)] for r in rows[1]]
    assert in_process == separate
    assert len({r["i2t_R@1"] + r["i2t_nll"] for r in rows[0]}) == 4  # the 4 runs differ from each other
    assert "step 10" in (Path(rows[0][3]["run_dir"]) / "train.log").read_text()  # the run's output, kept


def test_study_files_are_checked_before_any_run(tmp_path):
    for name in ("sigma", "alpha", "caption_noise", "sigma_alpha_grid", "sigma_relative", "mixup",
                 "data_efficiency", "siglip", "siglip_within"):
        study = load_study(name)  # shipped, by name
        assert study.seeds >= 3 and study.config.name == "demo.yaml" and study.baseline["mixup"] == "fusemix"
        assert study.benchmark == "emoji"  # the default for the demo config
    for name in ("openclipart_sigma", "openclipart_alpha", "openclipart_best", "openclipart_caption_noise",
                 "openclipart_data_efficiency"):
        study = load_study(name)
        assert study.benchmark == "openclipart" and study.seeds == 5 and study.baseline["sigma"] == 0
    assert load_study("openclipart_sigma").baseline == load_study("openclipart_alpha").baseline  # shared runs
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"benchmark": "coco"}))
    with pytest.raises(ConfigError, match="benchmark 'coco' is not one of emoji, openclipart"):
        load_study(tmp_path / "bad.yaml")
    assert len(load_study("sigma_alpha_grid").settings()) == 25
    # The two SigLIP studies read the same 8 settings, against one baseline or their objective's own.
    assert load_study("siglip").settings() == load_study("siglip_within").settings()
    assert len(load_study("siglip").settings()) == 8
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"grid": {"sgima": [0.1]}}))
    with pytest.raises(ConfigError, match="unknown axes \\['sgima'\\]"):
        load_study(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"seed": 3}))
    with pytest.raises(ConfigError, match="unknown keys \\['seed'\\]"):
        load_study(tmp_path / "bad.yaml")
    for name in ("../escape", "/tmp/elsewhere", "a/b", ".hidden"):  # OUT/<name> would leave OUT or hide
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"name": name}))
        with pytest.raises(ConfigError, match="must be a plain folder name"):
            load_study(tmp_path / "bad.yaml")


def test_calibration_is_compared_only_within_one_objective():
    """A SigLIP setting against the InfoNCE baseline: its recall differences are given, its
    calibration differences are not (a per-pair sigmoid confidence is not a softmax's)."""
    study = Study("s", Path("demo.yaml"), seeds=2, base={"objective": "infonce"},
                  grid={"objective": ["infonce", "siglip"], "alpha": [0, 0.1]})
    rows = [{**dict(setting.values), "seed": seed, **{m: float(10 * seed + k) for k, m in enumerate(METRICS)}}
            for setting in study.settings() for seed in range(2)]
    by_name = {s["setting"]: s for s in summarize(rows, study)}
    siglip, smoothed = by_name["objective=siglip"], by_name["alpha=0.1"]
    assert siglip["i2t_R@1_diff"] is not None and siglip["i2t_ece_diff"] is None
    assert smoothed["i2t_ece_diff"] is not None
    assert "n/a (other objective)" in markdown_tables(list(by_name.values()), study, None)


def test_a_study_may_set_what_only_its_objective_accepts(tmp_path):
    """A SigLIP study with a bias init in its overrides (refused for InfoNCE, the default
    objective): its runs and the feature RMS of its report load with the baseline's axes."""
    write_feature_shards(tmp_path / "train", 64, shards=1)
    write_feature_shards(tmp_path / "test", 16, seed=1, shards=1)
    feature_config(tmp_path, tmp_path / "train", tmp_path / "test")
    study = Study("s", tmp_path / "features.yaml", ["loss.logit_bias_init=-5"], seeds=2,
                  base={"objective": "siglip"}, grid={"alpha": [0.1]})
    check_runs(study, [])
    assert feature_rms(study, [])["image"] > 0


def test_paired_interval_is_the_t_interval_of_the_differences():
    """Differences 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.303: 2 +- 4.303 / sqrt(3)."""
    mean, low, high = paired_interval([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5), rel=1e-4)
    assert t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)  # past the table: Cornish-Fisher
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30, 31, 60, 200):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-3)


@pytest.mark.slow
def test_extract_then_cached_training_then_eval(tmp_path):
    towers = make_tiny_towers(tmp_path)
    write_image_shards(tmp_path / "train", [24] * 4, captions_per_sample=2)
    write_image_shards(tmp_path / "test", [16], start=1000)
    config = tmp_path / "towers.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": towers["vit"], "pooling": "mean"},
                  "text_tower": {"name": towers["bert"], "max_length": 16}},
        "data": {"image_size": 16}, "train": {"steps": 1}}))
    extract = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
               "alignvl_scale.cli", "extract", "--config", str(config), "--batch-size", "8"]
    for split in ("train", "test"):
        subprocess.run([*extract, "--data", str(tmp_path / split), "--out", str(tmp_path / "f" / split)], check=True,
                       cwd=ROOT, env=env(), capture_output=True, timeout=300)
    manifest = json.loads((tmp_path / "f" / "train" / "manifest.json").read_text())
    assert manifest["samples"] == 96 and [s["samples"] for s in manifest["shards"]] == [24] * 4
    assert manifest["image_dim"] == manifest["text_dim"] == 32 and manifest["towers"]["image"]["name"] == towers["vit"]
    # ZeRO-3: towers partitioned across the 2 ranks, run in lockstep; the test split has one
    # shard, so rank 1 only keeps rank 0's forwards company. Same features as unpartitioned.
    subprocess.run([*extract, "--data", str(tmp_path / "test"), "--out", str(tmp_path / "f" / "test_zero3"),
                    "engine.ds_config=ds_configs/zero3.json"], check=True, cwd=ROOT, env=env(), capture_output=True,
                   timeout=300)
    plain, zero3 = (load_retrieval_set(str(tmp_path / "f" / name)) for name in ("test", "test_zero3"))
    assert len(zero3.images) == 16
    np.testing.assert_allclose(np.stack(zero3.images), np.stack(plain.images), atol=2e-3)
    np.testing.assert_allclose(np.stack(zero3.texts), np.stack(plain.texts), atol=2e-3)
    # Idempotent: a rerun finds every shard done and rewrites none.
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "f" / "train").glob("*.tar"))]
    rerun = subprocess.run([*extract, "--data", str(tmp_path / "train"), "--out", str(tmp_path / "f" / "train")],
                           check=True, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert stamps == [p.stat().st_mtime_ns for p in sorted((tmp_path / "f" / "train").glob("*.tar"))]
    assert "48/48" in rerun.stderr  # the bar counts samples (rank 0's 2 shards); all done, it starts full
    # Another preprocessing into the same folder: every shard redone (it kept the old shards
    # and rewrote the manifest to describe the new config), and said so.
    before = load_retrieval_set(str(tmp_path / "f" / "train")).images[0]
    again = subprocess.run([*extract, "--data", str(tmp_path / "train"), "--out", str(tmp_path / "f" / "train"),
                            "data.image_mean=[0.2,0.3,0.4]"], check=True, cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=300)
    assert "redid 4 shards" in again.stdout
    assert f"extract -> {tmp_path / 'f' / 'train'}" in again.stderr and "48/48" in again.stderr
    assert all(a != b for a, b in zip(stamps, [p.stat().st_mtime_ns for p in sorted(
        (tmp_path / "f" / "train").glob("*.tar"))], strict=True))
    assert json.loads((tmp_path / "f" / "train" / "manifest.json").read_text())["image_transform"]["image_mean"] == \
        [0.2, 0.3, 0.4]
    assert not np.allclose(load_retrieval_set(str(tmp_path / "f" / "train")).images[0], before)

    # Cached-feature training, 2 ranks, ZeRO-2: adapters + loss only.
    run_dir = tmp_path / "run"
    cfg = yaml.safe_load(config.read_text())
    cfg.update({"model": {**cfg["model"], "embed_dim": 16, "noise_sigma": 0.0},
                "data": {"kind": "features", "train": [str(tmp_path / "f" / "train")], "batch_size": 8,
                         "workers": 1},
                "train": {"steps": 40, "lr": 0.003, "log_every": 4}, "eval": {"data": [str(tmp_path / "f" / "test")]},
                "run_dir": str(run_dir)})
    train_config = tmp_path / "train.yaml"
    train_config.write_text(yaml.safe_dump(cfg))
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(ROOT / "launchers/train.py"), "--config", str(train_config)], run_dir)
    losses = list(logged(run_dir, "train/loss").values())
    assert losses[-1] < losses[0]
    summary = json.loads((run_dir / "summary.json").read_text())

    # The exported model runs the towers itself: eval on the raw test images and captions
    # matches the in-training eval on their cached features (float16 features aside).
    raw = export_and_eval(run_dir, tmp_path, tmp_path / "test")
    for key in ("i2t_R@5", "t2i_R@5"):
        assert raw[key] == pytest.approx(summary["eval"][f"eval/{key}"], abs=13), key


def test_demo_extracts_with_an_image_text_view_of_its_config(tmp_path, monkeypatch):
    """`alignvl-scale demo` on a fresh machine: extraction runs before any feature manifest
    exists, so it must not build the features config's preprocessing (which needs one)."""
    import alignvl_scale.studies.demo as demo
    import alignvl_scale.studies.emoji as emoji
    from alignvl_scale.model.head import build_preprocessing

    seen = []
    monkeypatch.setattr(emoji, "build_demo_data", lambda out: {"train": 1, "test": 1})
    monkeypatch.setattr(demo, "extract", lambda cfg, specs, out: seen.append((cfg, build_preprocessing(cfg))))
    demo.prepare_features(tmp_path)
    assert [cfg.data.kind for cfg, _ in seen] == ["image-text", "image-text"]
