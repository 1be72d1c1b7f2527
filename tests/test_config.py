import pytest
import yaml

from alignvl_scale.config import ConfigError, load_config
from alignvl_scale.engine import fill_ds_config


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
    ("train.profile_steps=-1", "train.profile_steps: must be >= 0"),
    ("train.peak_tflops=0", "train.peak_tflops: must be null or > 0"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    path = write(tmp_path, {"data": {"train": ["a", "b"]}, "train": {"steps": 10}})
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert message in str(err.value)


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
        load_config(write(tmp_path, {"train": {"steps": 1}, "engine": {"ds_config": "ds_configs/zero3.json"}}))


def test_exponent_floats_without_a_dot(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 1\n  lr: 1e-4\n")
    assert load_config(path).train.lr == 1e-4


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batchsize: unknown key \(did you mean 'batch_size'\?\)"):
        load_config(write(tmp_path, {"data": {"batchsize": 4}, "train": {"steps": 1}}))


def test_public_api():
    import alignvl_scale

    assert alignvl_scale.align_vl_loss.__module__ == "alignvl_scale.loss"
    assert {"retrieval_metrics", "load_encoder", "load_config", "RunConfig"} <= set(alignvl_scale.__all__)
    assert alignvl_scale.load_config is load_config
