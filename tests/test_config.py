import json
import subprocess
import sys

import pytest
import torch
import yaml

from alignvl_scale.config import ConfigError, load_config
from alignvl_scale.training.engine import fill_ds_config
from alignvl_scale.training.preflight import check_components


def write(tmp_path, tree):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_yaml_plus_overrides(tmp_path):
    path = write(tmp_path, {"data": {"train": ["a", "b"], "batch_size": 8}, "train": {"steps": 10}})
    cfg = load_config(path, ["loss.smoothing=0.2", "data.batch_size=16", "model.text_tower.name=bert-base",
                             "loss.chunk_size=null", "data.image_mean=[0.1, 0.2, 0.3]"])
    assert cfg.loss.smoothing == 0.2 and cfg.data.batch_size == 16 and cfg.data.train == ["a", "b"]
    assert cfg.model.text_tower.name == "bert-base" and cfg.loss.chunk_size is None
    assert cfg.data.image_mean == [0.1, 0.2, 0.3]
    assert cfg.to_dict()["loss"]["smoothing"] == 0.2


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=two", "data.batch_size: must be an integer, got 'two'"),
    ("model.noise_sigma=-0.1", "model.noise_sigma: must be >= 0"),
    ("model.noise_mode=gaussian", "model.noise_mode: must be absolute or relative"),
    ("model.adapter=transformer", "model.adapter: must be mlp or linear"),
    ("data.mode=stream", "data.mode: must be epoch or resampled"),
    ("train.epochs=2", "train.steps: must be set, or train.epochs set"),
    ("train.precision=fp16", "train.precision: must be fp32 or bf16"),
    ("model.image_tower.pooling=max", "model.image_tower.pooling: must be one of"),
    ("nonsense.key=1", "nonsense: unknown key"),
    ("model.towers=1", "model.towers: unknown key"),
    ("data.train_weights=[1.0]", "data.train_weights: must be 2 positive numbers"),
    ("train.trainable=true", "train.trainable: unknown key"),
    ("loss.matmul_precision=fp16", "loss.matmul_precision: must be one of fp32, tf32, bf16"),
    ("loss.matmul_precision=bf16", "loss.matmul_precision: must be fp32 unless loss.chunk_size is set"),
    ("loss.objective=sigmoid", "loss.objective: must be infonce or siglip, got 'sigmoid'"),
    ("loss.logit_bias_init=-5", "loss.logit_bias_init: must be null for loss.objective infonce"),
    ("loss.logit_scale_init=200", "loss.logit_scale_init: must be null or in (0, 100]"),
    ("train.profile_steps=-1", "train.profile_steps: must be >= 0"),
    ("train.peak_tflops=0", "train.peak_tflops: must be null or > 0"),
    ("model.mixup=halves", "model.mixup: must be one of off, fusemix, permutation"),
    ("model.mixup_alpha=0.4", "model.mixup_alpha: must be null while model.mixup is off"),
    ("data.caption_noise=1.5", "data.caption_noise: must be in [0, 1]"),
    ("data.train_fraction=0", "data.train_fraction: must be in (0, 1]"),
    ("train.stop_signals=[SIGKILL]", "train.stop_signals: must be a list of catchable signal names"),
    ("train.stop_signals=[USR1]", "train.stop_signals: must be a list of catchable signal names"),
    ("engine.collective_timeout=0", "engine.collective_timeout: must be >= 1 (seconds)"),
    ("data.global_batch_size=0", "data.global_batch_size: must be null or >= 1"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    """What the config checks itself, and what its components check (the objective's bias) in
    preflight: both before any process group, naming the key."""
    path = write(tmp_path, {"data": {"train": ["a", "b"]}, "train": {"steps": 10}})
    with pytest.raises(ConfigError) as err:
        check_components(load_config(path, [override]))
    assert message in str(err.value)


def test_a_global_batch_sets_the_per_rank_batch_for_each_world(tmp_path):
    from alignvl_scale.config import for_world

    path = write(tmp_path, {"data": {"train": ["a"], "global_batch_size": 96},
                            "train": {"steps": 1, "accumulation": 2}})
    cfg = load_config(path)
    assert [for_world(cfg, w).data.batch_size for w in (1, 2, 3, 4, 6)] == [48, 24, 16, 12, 8]
    with pytest.raises(ConfigError, match=r"data.global_batch_size: must be a multiple of 5 ranks x "
                                          r"train.accumulation 2 = 10, got 96"):
        for_world(cfg, 5)
    with pytest.raises(ConfigError, match="per-rank batch is even with model.mixup fusemix"):
        for_world(load_config(path, ["model.mixup=fusemix"]), 16)  # 96 / 32 = 3
    with pytest.raises(ConfigError, match=r"set it \(96\) or data.batch_size \(8\), not both"):
        load_config(path, ["data.batch_size=8"])


def test_unequal_weights_need_resampled_mode(tmp_path):
    path = write(tmp_path, {"data": {"train": ["a", "b"], "train_weights": [1.0, 2.0]}, "train": {"steps": 1}})
    with pytest.raises(ConfigError, match="data.train_weights: must be equal unless data.mode is resampled"):
        load_config(path)
    assert load_config(path, ["data.mode=resampled"]).data.train_weights == [1.0, 2.0]


def test_ds_config_autos_come_from_the_run_config(tmp_path):
    cfg = load_config(write(tmp_path, {"data": {"batch_size": 24}, "train": {"steps": 1, "grad_clip": 0.5,
                                                                            "precision": "bf16"},
                                       "engine": {"ds_config": "ds_configs/zero3.json"}}))
    ds = fill_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 24 and ds["train_batch_size"] == 96
    assert ds["gradient_clipping"] == 0.5
    # bf16: autocast over fp32 parameters, never DeepSpeed's all-bf16 parameters.
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert ds["zero_optimization"]["stage"] == 3
    assert "'auto'" not in str(ds)


def test_accelerate_config_file_picks_the_ds_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero1.json")
    cfg = load_config(write(tmp_path, {"train": {"steps": 1}}))
    assert fill_ds_config(cfg, 2)["zero_optimization"]["stage"] == 1
    with pytest.raises(ConfigError, match="differs from the accelerate config"):
        check_components(load_config(write(tmp_path, {"train": {"steps": 1},
                                                      "engine": {"ds_config": "ds_configs/zero3.json"}})))


def test_exponent_floats_without_a_dot(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 1\n  lr: 1e-4\n")
    assert load_config(path).train.lr == 1e-4


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batchsize: unknown key \(did you mean 'batch_size'\?\)"):
        load_config(write(tmp_path, {"data": {"batchsize": 4}, "train": {"steps": 1}}))


def test_public_api():
    import alignvl_scale

    assert alignvl_scale.align_vl_loss.__module__ == "alignvl_scale.losses.infonce"
    assert {"retrieval_metrics", "load_encoder", "load_config", "RunConfig"} <= set(alignvl_scale.__all__)
    assert alignvl_scale.load_config is load_config


def test_no_clipping_skips_zeros_gradient_norm_pass(tmp_path):
    for stage, clip, expected in ((2, 0.0, False), (1, 0.0, False), (2, 1.0, None), (3, 0.0, None)):
        cfg = load_config(write(tmp_path, {"train": {"steps": 1, "grad_clip": clip},
                                           "engine": {"ds_config": f"ds_configs/zero{stage}.json"}}))
        assert fill_ds_config(cfg, world_size=2)["zero_optimization"].get("compute_grad_norm") is expected, stage


def test_gpu_only_zero_settings_resolve_by_device(tmp_path, monkeypatch):
    """The shipped JSONs' "auto" settings that pay on a GPU only: zero1/zero2's
    contiguous_gradients (one buffer against fragmentation; on CPU a copy of every gradient)
    and zero3's reduce_scatter (half an all-reduce's bytes on NCCL; on gloo slower than the
    all-reduce of ZeRO-3's contiguous buffer). A value the user's JSON sets stays."""
    for spec, key in [("zero1", "contiguous_gradients"), ("zero2", "contiguous_gradients"),
                      ("zero3", "reduce_scatter"), ("zero3_offload", "reduce_scatter")]:
        cfg = load_config(write(tmp_path, {"train": {"steps": 1}, "engine": {"ds_config": spec}}))
        for cuda in (False, True):
            monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
            assert fill_ds_config(cfg, world_size=2)["zero_optimization"][key] is cuda, (spec, cuda)
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3, "contiguous_gradients": True,
                                                     "reduce_scatter": True}}))
    cfg = load_config(write(tmp_path, {"train": {"steps": 1}, "engine": {"ds_config": str(own)}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    zero = fill_ds_config(cfg, world_size=2)["zero_optimization"]
    assert zero["contiguous_gradients"] is True and zero["reduce_scatter"] is True


def test_shipped_ds_configs_resolve_by_name(tmp_path, monkeypatch):
    from alignvl_scale.config import DS_CONFIGS, EngineConfig
    from alignvl_scale.training.engine import resolve_ds_config
    monkeypatch.chdir(tmp_path)  # not the source tree
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    for spec in ("zero3", "zero3.json", "ds_configs/zero3.json"):
        assert resolve_ds_config(EngineConfig(ds_config=spec)) == DS_CONFIGS / "zero3.json", spec
    with pytest.raises(ConfigError, match="or one of zero0, zero1, zero2, zero3, zero3_offload, got 'zero4'"):
        resolve_ds_config(EngineConfig(ds_config="zero4"))


def _config_classes(cls=None):
    import dataclasses

    from alignvl_scale.config import RunConfig
    cls = cls or RunConfig
    yield cls
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _config_classes(type(default))


def test_every_config_key_has_a_docstring():
    import dataclasses

    from alignvl_scale.config import field_docs
    for cls in set(_config_classes()):
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not missing, f"{cls.__name__}: {sorted(missing)} need a docstring under the field"


def test_config_show_prints_yaml_that_loads_back_with_every_key_explained(tmp_path):
    import subprocess
    import sys
    path = write(tmp_path, {"data": {"train": ["a"]}, "train": {"steps": 10}})
    proc = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "config", "show", "--config", str(path),
                           "loss.smoothing=0.3", "model.adapter=linear"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(proc.stdout) == load_config(path, ["loss.smoothing=0.3", "model.adapter=linear"]).to_dict()
    assert "smoothing: 0.3  # Embedding Smoothing alpha" in proc.stdout
    assert all("#" in line for line in proc.stdout.splitlines())
    defaults = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "config", "show", "--defaults"],
                              capture_output=True, text=True, check=True).stdout
    assert "ds_config: null  # The DeepSpeed JSON" in defaults


def test_mixup_modes_and_fusemix_needs_an_even_batch(tmp_path):
    path = write(tmp_path, {"data": {"train": ["a"], "batch_size": 7}, "train": {"steps": 10}})
    assert load_config(path, ["model.mixup=off"]).model.mixup == "off"  # YAML reads a bare off as false
    assert load_config(path, ["model.mixup=permutation"]).model.mixup_beta == 1.0  # FuseMix's Beta(1, 1)
    with pytest.raises(ConfigError, match="data.batch_size: must be even when model.mixup is fusemix"):
        load_config(path, ["model.mixup=fusemix"])


@pytest.mark.parametrize("name", ["demo.yaml", "image_text.yaml", "fusemix.yaml"])
def test_shipped_example_configs_validate(name):
    from alignvl_scale.config import CONFIGS
    load_config(CONFIGS / name, ["data.train=[shards]"] if name == "fusemix.yaml" else [])


def test_every_cli_flag_has_help():
    import argparse

    from alignvl_scale.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif action.option_strings and action.dest not in ("help", "version"):
                yield path, action
    missing = [f"{path} {action.option_strings[0]}" for path, action in walk(build_parser(), "alignvl-scale")
               if not action.help]
    assert not missing, missing


def test_train_help_names_the_command_and_imports_no_torch():
    """`alignvl-scale train --help` said `usage: alignvl-scale [-h] --config...`, without `train`,
    after importing torch, DeepSpeed and the trainer (12-17 s under load)."""
    probe = ("import sys\nfrom alignvl_scale.cli import main\ntry:\n    main(['train', '--help'])\n"
             "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("usage: alignvl-scale train [-h] [--config CONFIG]"), proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("torch imported: False")


def test_train_overrides_may_come_before_and_after_the_options():
    from alignvl_scale.training.arguments import parse_args

    args = parse_args(["--config", "run.yaml", "loss.smoothing=0.1", "--resume", "latest", "loss.objective=siglip",
                       "--local_rank=0"])
    assert args.overrides == ["loss.smoothing=0.1", "loss.objective=siglip"] and args.resume == "latest"
