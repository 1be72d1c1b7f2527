"""How towers train (alignvl_scale/model/finetune.py) and how decoder LLM text towers pool.

Unit level: LoRA starts at the pretrained tower, trains only its updates and merges back to
the plain architecture with the same outputs; last_n trains the last blocks and the final
norm; pooling gives each caption the vector it gets alone, with left or right padding; the
instruction prefix survives truncation. Then the trainer on 2 gloo ranks (torchrun), ZeRO 1-3,
a LoRA Llama text tower and a last_n ViT with a decaying schedule, dropout everywhere and
GradCache accumulation: gradient checkpointing changes no logged loss, neither do ZeRO-3's
leaf blocks (nor the weights), and the merged export encodes as the trained checkpoint does;
such a run resized from 2 ranks under ZeRO-2 to 3 under ZeRO-3 keeps every frozen weight."""

import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_continues, logged, resumable_copy, run, torchrun
from distributed import run_ranks
from PIL import Image

from alignvl_scale.config import ConfigError, DataConfig, LoraSettings, TowerConfig, load_config
from alignvl_scale.data.synthetic import make_tiny_towers, png_bytes, write_image_shards
from alignvl_scale.model.finetune import merge_lora, transformer_blocks
from alignvl_scale.model.towers import build_preprocessing, build_tower

DATA = DataConfig(image_size=16)
CAPTIONS = ["a cat", "a small red bicycle leaning on a wall", "two dogs playing in the snow at dusk"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return make_tiny_towers(tmp_path_factory.mktemp("towers"))


def _tokens(tower_cfg: TowerConfig, captions: list[str]) -> dict:
    return build_preprocessing(tower_cfg, "text", DATA)(captions)


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_pooling_gives_each_caption_its_own_vector_with_either_padding(towers, pooling):
    """A Llama tower (causal, rotary positions) pooled over a padded batch gives every
    caption the vector it gets encoded alone with no padding at all, padded left or right."""
    alone = TowerConfig(name=towers["llama"], pooling=pooling, max_length=1)  # max_length unused below
    tower = build_tower(alone, "text", DATA).eval()
    tokenizer = build_preprocessing(alone, "text", DATA).tokenizer
    with torch.no_grad():
        reference = torch.stack([tower(**{k: v for k, v in tokenizer([c], return_tensors="pt").items()
                                          if k in ("input_ids", "attention_mask")})[0] for c in CAPTIONS])
        for side in ("right", "left"):
            cfg = TowerConfig(name=towers["llama"], pooling=pooling, max_length=24, padding_side=side)
            batch = _tokens(cfg, CAPTIONS)
            pads = (batch["attention_mask"] == 0)
            assert pads.any() and (pads[:, 0] if side == "left" else pads[:, -1]).any()
            assert torch.allclose(tower(**batch), reference, atol=1e-5), side


def test_prefix_is_prepended_and_survives_truncation(towers):
    cfg = TowerConfig(name=towers["llama"], max_length=6, prefix="query: ")
    tokenize = build_preprocessing(cfg, "text", DATA)
    ids = tokenize([CAPTIONS[2]])["input_ids"][0].tolist()
    prefix_ids = tokenize.tokenizer("query: ", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and prefix_ids[0] in ids[:2] and ids[ids.index(prefix_ids[0]):][:len(prefix_ids)] == prefix_ids


def _lora_tower(towers, **lora) -> torch.nn.Module:
    cfg = TowerConfig(name=towers["llama"], trainable=True, finetune="lora", lora=LoraSettings(rank=4, **lora))
    return build_tower(cfg, "text", DATA)


def test_lora_starts_at_the_pretrained_tower_trains_only_its_updates_and_merges_back(towers):
    plain = build_tower(TowerConfig(name=towers["llama"]), "text", DATA).eval()
    tower = _lora_tower(towers).eval()
    batch = _tokens(TowerConfig(name=towers["llama"], max_length=12), CAPTIONS)
    with torch.no_grad():
        assert torch.equal(tower(**batch), plain(**batch))  # B = 0: the pretrained function
    trained = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert {n.split(".")[-4] for n in trained} == {"q_proj", "v_proj"}  # PEFT's default for Llama
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as after training
        updated = tower(**batch)
        assert not torch.allclose(updated, plain(**batch), atol=1e-3)
        assert merge_lora(tower) and not merge_lora(tower)
        assert torch.allclose(tower(**batch), updated, atol=1e-5)
    assert set(tower.state_dict()) == set(plain.state_dict())  # the plain architecture's keys


def _lora_under_zero_init(rank: int, world: int, llama: str) -> dict:
    import deepspeed

    from alignvl_scale.runtime.ds_ops import prepare_deepspeed_ops
    from alignvl_scale.training.engine import zero3_init

    prepare_deepspeed_ops(on_gpu=False)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 3}}
    with zero3_init(ds):  # the trainer's context
        tower = build_tower(TowerConfig(name=llama, trainable=True, finetune="lora"), "text", DATA)
    params = dict(tower.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items() if "lora_" in n}


def test_lora_built_under_zero3_init_starts_at_zero(tmp_path, towers):
    """PEFT initializes B = 0 by writing into the parameter, which zero.Init has already
    partitioned (an empty tensor): B would keep a random init and the tower would not start
    as the pretrained one. Two ranks, gathered: every B is zero, every A is not, alike on
    both ranks."""
    per_rank = run_ranks(_lora_under_zero_init, 2, tmp_path, towers["llama"])
    for lora in per_rank:
        assert "error" not in lora, lora.get("traceback")
        assert lora and all((p == 0).all() == ("lora_B" in n) for n, p in lora.items())
    assert all(torch.equal(per_rank[0][n], per_rank[1][n]) for n in per_rank[0])


def test_gradient_checkpointing_recomputes_blocks_and_still_reaches_lora(towers):
    """Non-reentrant checkpointing: each block's layers run again in backward (transformers
    checkpoints a block's forward, so hooks on the block itself run once; those on its
    layers, as ZeRO-3's, run again), and the LoRA updates
    get gradients although no input of a block needs one (reentrant checkpointing gives
    them none)."""
    batch = _tokens(TowerConfig(name=towers["llama"], max_length=12), CAPTIONS)
    grads = {}
    for checkpointing in (False, True):
        cfg = TowerConfig(name=towers["llama"], trainable=True, finetune="lora", gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # the same A
        tower = build_tower(cfg, "text", DATA).train()
        calls = []
        mlp = transformer_blocks(tower)[1][0].mlp
        # A pre-hook: recomputation stops once it has what backward needs, before a post-hook.
        mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        tower(**batch).pow(2).sum().backward()
        assert len(calls) == (2 if checkpointing else 1)
        grads[checkpointing] = {n: p.grad for n, p in tower.named_parameters() if p.requires_grad}
    assert all(g.abs().max() > 0 for n, g in grads[True].items() if "lora_B" in n)  # (A's are 0 while B = 0)
    assert all(torch.allclose(grads[True][n], grads[False][n], atol=1e-6) for n in grads[False])


def test_last_n_trains_the_last_blocks_and_what_follows_them(towers):
    cfg = TowerConfig(name=towers["vit"], trainable=True, finetune="last_n", last_n=1)
    tower = build_tower(cfg, "image", DATA)
    name, blocks = transformer_blocks(tower)
    assert name == "model.layers" and len(blocks) == 2
    trained = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in tower.named_parameters()
                       if n.startswith(("model.layers.1.", "model.layernorm.", "model.pooler."))}
    assert tower.trainable


@pytest.mark.parametrize("overrides,message", [
    (["model.text_tower.finetune=lora"], "model.text_tower.finetune: must be full unless model.text_tower.trainable"),
    (["model.text_tower.trainable=true", "model.text_tower.init=random", "model.text_tower.finetune=last_n"],
     "model.text_tower.finetune: must be full when model.text_tower.init is random"),
    (["model.text_tower.lora.rank=0"], "model.text_tower.lora.rank: must be >= 1"),
    (["model.text_tower.lora.target_modules=[]"], "model.text_tower.lora.target_modules: must be null or a non-empty"),
    (["model.image_tower.lr=0"], "model.image_tower.lr: must be null or > 0"),
    (["model.text_tower.padding_side=middle"], "model.text_tower.padding_side: must be right or left"),
])
def test_finetune_settings_are_checked_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_towers_that_cannot_take_the_setting_say_so(towers):
    with pytest.raises(ConfigError, match=r"model.image_tower.last_n: must be at most the tower's 2 blocks"):
        build_tower(TowerConfig(name=towers["vit"], trainable=True, finetune="last_n", last_n=3), "image", DATA)
    with pytest.raises(ConfigError, match=r"model.text_tower.lora.target_modules: .*nope"):
        build_tower(TowerConfig(name=towers["llama"], trainable=True, finetune="lora",
                                lora=LoraSettings(target_modules=["nope"])), "text", DATA)
    with pytest.raises(ConfigError, match="model.image_tower.lora.target_modules: PEFT has no default"):
        build_tower(TowerConfig(kind="efficientnet_lite0", trainable=True, finetune="lora"), "image", DATA)


def test_zero3_leaf_blocks_are_the_towers_blocks_and_a_tower_without_any_keeps_its_hooks(towers):
    """engine.zero3_leaf_blocks marks each block of a tower with a block list, pre-hooks only
    the blocks that train, and leaves a tower of another shape (no nn.ModuleList) alone."""
    from types import SimpleNamespace

    from deepspeed.utils import z3_leaf_module

    from alignvl_scale.training.engine import zero3_leaf_blocks

    llama = build_tower(TowerConfig(name=towers["llama"], trainable=True, finetune="last_n", last_n=1), "text", DATA)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    assert zero3_leaf_blocks(SimpleNamespace(image_tower=other, text_tower=llama)) == 2
    blocks = transformer_blocks(llama)[1]
    assert all(z3_leaf_module(b) for b in blocks) and not any(z3_leaf_module(m) for m in other.modules())
    assert [len(b._forward_pre_hooks) for b in blocks] == [0, 1]  # the frozen first block needs none


def _train(tmp_path, towers, name: str, stage: int, checkpointing: bool, *overrides: str, ranks: int = 2):
    run_dir = tmp_path / name
    tower = {"trainable": True, "gradient_checkpointing": checkpointing}
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": towers["vit"], "pooling": "mean", "finetune": "last_n", "lr": 0.001,
                                  **tower},
                  "text_tower": {"name": towers["llama"], "max_length": 10, "padding_side": "left",
                                 "prefix": "caption: ", "finetune": "lora", "lr": 0.01,
                                  "lora": {"rank": 4, "alpha": 8, "dropout": 0.2,
                                           "target_modules": ["q_proj", "v_proj", "down_proj"]}, **tower},
                  "embed_dim": 16, "adapter_depth": 1, "dropout": 0.2, "noise_sigma": 0.05},
        "loss": {"smoothing": 0.1},
        "data": {"train": [str(tmp_path / "shards")], "batch_size": 4, "workers": 0, "image_size": 16},
        "train": {"steps": 4, "lr": 0.003, "warmup_steps": 1, "log_every": 1, "accumulation": 2},
        "run_dir": str(run_dir)}))
    proc = run(torchrun(config, ranks, stage, *overrides), run_dir, timeout=600)
    (tmp_path / f"{name}.out").write_text(proc.stdout)
    return run_dir


def assert_same_weights(run_a: Path, run_b: Path, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """The two runs' step-4 checkpoints hold the same weights, key for key; by default up to
    fp32 rounding (which Adam's normalized update can lift to ~1e-6 where a gradient is near 0)."""
    from alignvl_scale.export.exporter import consolidated_state_dict

    a, b = (consolidated_state_dict(run / "checkpoints" / "step_00000004") for run in (run_a, run_b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_checkpointing_lora_and_last_n_change_no_loss_and_export_merges(tmp_path, towers, stage):
    """2 ranks, a decaying LR with warmup, dropout in the adapters and in LoRA, noise on,
    GradCache over 2 micro-batches: the run with gradient checkpointing logs the same losses
    and learning rates as the one without, the towers' own learning rates are followed, and
    the export (LoRA merged) encodes images and captions as the checkpoint does."""
    from alignvl_scale.export.exporter import export, load_encoder

    write_image_shards(tmp_path / "shards", [16] * 4)
    plain = _train(tmp_path, towers, "plain", stage, checkpointing=False)
    recomputed = _train(tmp_path, towers, "ckpt", stage, checkpointing=True)
    losses = logged(plain, "train/loss")
    assert len(losses) == 4 and len(set(losses.values())) == 4
    assert logged(recomputed, "train/loss") == pytest.approx(losses, rel=1e-5)
    if stage == 3:  # tower blocks as leaf modules (the default) against DeepSpeed's hooks on every module
        assert "ZeRO-3 leaf modules: 4 tower blocks" in (tmp_path / "plain.out").read_text()
        hooked = _train(tmp_path, towers, "hooked", stage, False, "engine.zero3_leaf_blocks=false")
        assert "leaf modules" not in (tmp_path / "hooked.out").read_text()
        assert logged(hooked, "train/loss") == pytest.approx(losses, rel=1e-5)
        assert_same_weights(plain, hooked)
    assert logged(recomputed, "train/lr") == logged(plain, "train/lr")
    head_lr, lora_lr, vit_lr = (logged(plain, key) for key in ("train/lr", "train/lr_text_tower",
                                                                "train/lr_image_tower"))
    assert len(set(head_lr.values())) == 3  # warmup to the peak, then cosine down
    for step, lr in head_lr.items():
        assert (lora_lr[step] / lr, vit_lr[step] / lr) == pytest.approx((0.01 / 0.003, 0.001 / 0.003))

    checkpoint = plain / "checkpoints" / "step_00000004"
    out = export(checkpoint, tmp_path / "export")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["text_tower"]["finetune"] == "full"  # merged: the plain architecture
    trained, exported = load_encoder(checkpoint), load_encoder(out)
    lora_b = [p for n, p in trained.text_tower.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # trained away from zero
    assert not any("lora" in n for n, _ in exported.text_tower.named_parameters())
    images = [Image.open(io.BytesIO(png_bytes(i))) for i in range(4)]
    assert torch.allclose(exported.encode_texts(CAPTIONS), trained.encode_texts(CAPTIONS), atol=1e-5)
    assert torch.allclose(exported.encode_images(images), trained.encode_images(images), atol=1e-5)
    # --format hf (merged the same way): transformers loads it and encodes as the checkpoint does, given the
    # tokens the run's preprocessing makes (the prefix is the run config's, shown in the model card).
    from transformers import AutoModel

    import alignvl_scale.export.hf  # noqa: F401  (registers the alignvl model type)
    from alignvl_scale.export.exporter import export_hf

    hf_model = AutoModel.from_pretrained(export_hf(checkpoint, tmp_path / "hf")).eval()
    tokens = trained.preprocessing.tokenize(CAPTIONS)
    with torch.no_grad():
        text = hf_model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    assert not any("lora" in key for key in hf_model.state_dict())
    assert torch.allclose(text, trained.encode_texts(CAPTIONS), atol=1e-5)
    assert "caption: " in (tmp_path / "hf" / "README.md").read_text()
    summary = json.loads((plain / "summary.json").read_text())
    assert summary["step"] == 4


def _trainable_towers_run(tmp_path: Path, towers: dict, name: str, ranks: int, *overrides: str) -> Path:
    """Both towers trained with dropout inside: a full BERT text tower (hidden and attention
    dropout 0.1) and a LoRA ViT (LoRA dropout 0.2), the head's noise and dropout on, a decaying
    LR; 12 samples a step over 6 data streams; every step's loss and sample keys logged."""
    run_dir = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": towers["vit"], "pooling": "mean", "trainable": True, "finetune": "lora",
                                  "lora": {"rank": 4, "dropout": 0.2, "target_modules": ["q_proj", "v_proj"]}},
                  "text_tower": {"name": towers["bert"], "max_length": 12, "trainable": True, "lr": 0.001},
                  "embed_dim": 16, "adapter_depth": 1, "dropout": 0.1, "noise_sigma": 0.05},
        "data": {"train": [str(tmp_path / "shards")], "global_batch_size": 12, "streams": 6, "workers": 1,
                 "image_size": 16},
        "train": {"steps": 6, "lr": 0.003, "warmup_steps": 1, "min_lr_ratio": 0.1, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 5}, "log": {"sample_keys": True}, "run_dir": str(run_dir)}))
    run(torchrun(config, ranks, 2, *overrides), run_dir, timeout=600)
    return run_dir


def test_trainable_towers_resized_from_two_ranks_to_three_continue_the_same_losses(tmp_path, towers):
    """Issue 41, item 4: the towers' own dropout is keyed by the sample (model/keyed.py), so a
    run with trainable towers checkpointed on 2 ranks at step 2 and resumed on 3 trains every
    later step on the uninterrupted run's samples to its loss (rel 1e-5; with torch's dropout
    the losses were up to 5.5% apart), across an epoch's end (39 samples: 4 micro-batches)."""
    write_image_shards(tmp_path / "shards", [10, 7, 13, 9])
    uninterrupted = _trainable_towers_run(tmp_path, towers, "two", 2)
    resumable_copy(uninterrupted, 2, tmp_path / "three")
    resumed = _trainable_towers_run(tmp_path, towers, "three", 3, "--resume", "latest")
    assert sorted(logged(resumed, "train/loss")) == [3, 4, 5, 6]
    assert_continues(resumed, uninterrupted, 2)


@pytest.mark.slow
def test_a_lora_run_resumes_on_another_world_and_stage_with_its_frozen_weights(tmp_path, towers):
    """A LoRA tower and a last_n tower keep frozen weights that no optimizer partition holds.
    2 ranks under ZeRO-2 -> 3 ranks under ZeRO-3 (through the universal conversion): right
    after the resume (0 more steps, saved again) every weight, frozen base, LoRA updates and
    head, equals the checkpoint's exactly; then training goes on."""
    write_image_shards(tmp_path / "shards", [16] * 4)
    source = _train(tmp_path, towers, "two", 2, False)
    resumable_copy(source, 4, tmp_path / "run")
    # The 2-rank run read 2 data streams, which 3 ranks cannot share: re-dealt into 3 (the
    # same batches after a resize are test_cluster.py's; this test is about the weights).
    out = _train(tmp_path, towers, "run", 3, False, "--resume", "latest", "data.streams=3", ranks=3)
    assert "ZeRO-2 on 2 ranks, now ZeRO-3 on 3 ranks" in (tmp_path / "run.out").read_text()
    assert_same_weights(source, out, rtol=0, atol=0)
    _train(tmp_path, towers, "run", 3, False, "--resume", "latest", "train.steps=6", "data.streams=3", ranks=3)
    losses = logged(out, "train/loss")
    assert sorted(losses) == [5, 6] and all(math.isfinite(x) for x in losses.values()), losses
