"""Contrastive gradient accumulation (GradCache) against the reference it must equal: the
K micro-batches forwarded in one autograd graph, the loss on their concatenation, one
backward. Noise, dropout and mixup are on, so the RNG replay matters: plain autograd on 1
and 2 gloo ranks, plain and chunked loss; then inside DeepSpeed engines under ZeRO 1, 2
and 3 (the parameter update). Then the trainer: K micro-batches of B give the same losses
as one batch of K x B (noise, dropout and mixup off: their draws depend on how a batch is
cut), with frozen and trainable towers, and a resume stays exact. ZeRO-1 cells and the
2-rank ZeRO-3 trainer run are marked slow."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, env, logged
from distributed import run_ranks

import alignvl_scale.training.accumulate as accumulate
from alignvl_scale.checkpoint.store import read_states
from alignvl_scale.config import LossConfig, counted
from alignvl_scale.data.synthetic import write_feature_shards
from alignvl_scale.losses.registry import OBJECTIVES, HeadOutput
from alignvl_scale.model.head import AlignVLHead
from alignvl_scale.runtime.distributed import free_port
from alignvl_scale.training.accumulate import accumulated_backward

K, B, DIM = 3, 4, 12


def _head(rank: int, objective: str = "infonce") -> AlignVLHead:
    torch.manual_seed(0)
    head = AlignVLHead(DIM, DIM, 8, adapter="mlp", adapter_depth=1, dropout=0.3, noise_sigma=0.2, mixup="fusemix",
                       mixup_alpha=0.5, seed=5, rank=rank, objective=OBJECTIVES[objective])
    return head.train()


def _loss_fn(objective: str, chunk: int | None):
    cfg = LossConfig(objective=objective, smoothing=0.2, chunk_size=chunk)
    return lambda out: OBJECTIVES[objective].loss(out, cfg)


def _one_graph(outs: list[HeadOutput]) -> HeadOutput:
    """The micro-batches' outputs as one batch (the learned scalars are the same in each)."""
    return HeadOutput(torch.cat([o.image for o in outs]), torch.cat([o.text for o in outs]), *outs[-1][2:])


def _micro_batches(rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + rank)
    return [{"x": torch.randn(B, DIM, generator=g), "y": torch.randn(B, DIM, generator=g)} for _ in range(K)]


def _grads(head) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in head.named_parameters()}


def _compare(rank: int, world: int, chunk: int | None, sabotage: str, objective: str = "infonce") -> dict:
    if sabotage == "no_rng_replay":
        accumulate.rng_restore = lambda state, modules: None
    batches = _micro_batches(rank)
    loss_fn = _loss_fn(objective, chunk)

    torch.manual_seed(1000 + rank)  # dropout stream, the same start for both computations
    reference = _head(rank, objective)
    want = loss_fn(_one_graph([reference(b["x"], b["y"]) for b in batches]))
    want.loss.backward()

    torch.manual_seed(1000 + rank)
    head = _head(rank, objective)

    def backward(surrogate):
        (surrogate * (2.0 if sabotage == "double_scale" else 1.0)).backward()

    got, _ = accumulated_backward(batches, lambda b: head(b["x"], b["y"]), loss_fn, backward, head.random_modules())
    return {"loss": (got.loss.item(), want.loss.item()), "got": _grads(head), "want": _grads(reference)}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("objective", ["infonce", "siglip"])
def test_accumulation_equals_one_graph_over_the_concatenated_batch(tmp_path, world, chunk, objective):
    """Every parameter's gradient, the temperature's and (siglip) the bias's included."""
    for result in run_ranks(_compare, world, tmp_path, chunk, "none", objective):
        assert "error" not in result, result.get("traceback")
        assert result["loss"][0] == pytest.approx(result["loss"][1], rel=1e-6)
        assert ("logit_bias.value" in result["want"]) == (objective == "siglip")
        for name, want in result["want"].items():
            # atol: float32 rounding of sums of terms up to max|want| (other summation orders differ by ~1e-7 of it)
            atol = 1e-6 * max(want.abs().max().item(), 1e-1)
            torch.testing.assert_close(result["got"][name], want, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("sabotage", ["no_rng_replay", "double_scale"])
def test_the_equivalence_check_catches_a_broken_replay_or_scaling(tmp_path, sabotage):
    (result,) = run_ranks(_compare, 1, tmp_path, None, sabotage)
    assert "error" not in result, result.get("traceback")
    assert any(not torch.allclose(result["got"][n], w, rtol=1e-5, atol=1e-7) for n, w in result["want"].items())


# -- the trainer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    write_feature_shards(root / "f", 8 * 32, shards=8)
    return root / "f"


NOISY = {"noise_sigma": 0.05, "dropout": 0.2, "mixup": "fusemix", "mixup_alpha": 0.5}


def _train(tmp_path: Path, features: Path, name: str, stage: int, accumulation: int, batch: int, ranks: int,
           *args: str, model: dict | None = None) -> Path:
    run_dir = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"embed_dim": 16, "adapter": "mlp", "adapter_depth": 1, "noise_sigma": 0.0, "dropout": 0.0,
                  **(model or {})},
        "data": {"kind": "features", "train": [str(features)], "batch_size": batch, "workers": 1, "streams": 2},
        "train": {"steps": 6, "lr": 0.01, "warmup_steps": 2, "log_every": 1, "accumulation": accumulation},
        "loss": {"smoothing": 0.1}, "checkpoint": {"every": 2, "keep": 3}, "run_dir": str(run_dir)}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                           "--master_port", str(free_port()), str(ROOT / "launchers/train.py"), "--config", str(config),
                           f"engine.ds_config=ds_configs/zero{stage}.json", *args],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / f"{name}.out").write_text(proc.stdout)
    return run_dir


@pytest.mark.parametrize("stage,ranks", [pytest.param(1, 2, marks=pytest.mark.slow), (2, 1),
                                         pytest.param(3, 2, marks=pytest.mark.slow)])
def test_trainer_k_micro_batches_equal_one_batch_of_k_times_b(tmp_path, features, stage, ranks):
    """Noise, dropout and mixup off (their draws depend on how a batch is cut); the same data
    streams (whose default depends on the micro-batch) read the same samples into each step."""
    one = logged(_train(tmp_path, features, "one", stage, 1, 16, ranks), "train/loss")
    accumulated = _train(tmp_path, features, "acc", stage, 4, 4, ranks)
    assert logged(accumulated, "train/contrastive_batch")[6] == 16 * ranks
    start_line = f"{counted(ranks, 'rank')} x 4 x 4 accumulated = contrastive batch {16 * ranks}"
    assert start_line in (tmp_path / "acc.out").read_text()
    assert logged(accumulated, "train/loss") == pytest.approx(one, rel=1e-5)


@pytest.mark.slow
def test_resume_falls_on_optimizer_steps_and_stays_exact(tmp_path, features):
    """Checkpoints are taken after whole accumulation cycles; resuming from one continues
    with the same losses (data position, RNG) as the run that never stopped. With the
    sigmoid objective: its bias goes through GradCache and the checkpoint too."""
    run_dir = _train(tmp_path, features, "run", 2, 2, 8, 1, "loss.objective=siglip", model=NOISY)
    reference = logged(run_dir, "train/loss")
    bias = logged(run_dir, "train/logit_bias")
    assert bias[1] == -10.0 and bias[6] != bias[5] != bias[1]
    state = read_states(run_dir / "checkpoints/step_00000004", rank=0)
    assert state["progress"]["step"] == 4 and state["data"]["stream"]["batches"] == 8  # 4 steps x 2 micro-batches
    resumed = _train(tmp_path, features, "run", 2, 2, 8, 1, "--resume", str(run_dir / "checkpoints/step_00000004"),
                     "loss.objective=siglip", model=NOISY)
    again = logged(resumed, "train/loss")
    for step in (5, 6):
        assert again[step] == pytest.approx(reference[step], rel=1e-6)
        assert logged(resumed, "train/logit_bias")[step] == pytest.approx(bias[step], rel=1e-6)


def test_trainable_tower_is_re_run_and_still_equals_one_large_batch(tmp_path):
    """A trainable image tower (no fast path: the whole model runs twice per micro-batch).
    ViT's dropout is 0 by default and the adapters' is set to 0, so one batch of 8 and two
    micro-batches of 4 must give the same losses."""
    from conftest import make_tiny_towers, write_image_shards

    towers = make_tiny_towers(tmp_path / "towers")
    write_image_shards(tmp_path / "shards", [16] * 4)
    losses = {}
    for accumulation, batch in ((1, 8), (2, 4)):
        run_dir = tmp_path / f"run{accumulation}"
        config = tmp_path / f"run{accumulation}.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"image_tower": {"name": towers["vit"], "pooling": "mean", "trainable": True},
                      "text_tower": {"name": towers["bert"], "max_length": 8}, "embed_dim": 16, "adapter_depth": 1,
                      "noise_sigma": 0.0, "dropout": 0.0},
            "data": {"train": [str(tmp_path / "shards")], "batch_size": batch, "workers": 1, "image_size": 16,
                     "streams": 4},
            "train": {"steps": 4, "lr": 0.003, "log_every": 1, "accumulation": accumulation},
            "run_dir": str(run_dir)}))
        proc = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config)],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[accumulation] = logged(run_dir, "train/loss")
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)


def _engine_update(rank: int, world: int, stage: int, chunk: int | None, cached: bool) -> dict:
    """One optimizer step of a DeepSpeed engine (ZeRO `stage`) on the head, with noise,
    dropout and mixup on: either the K micro-batches forwarded in one graph (micro batch K x B,
    no accumulation), or accumulated_backward (micro batch B, K accumulation steps)."""
    import deepspeed

    from alignvl_scale.runtime.ds_ops import prepare_deepspeed_ops

    prepare_deepspeed_ops(on_gpu=False)  # no shared-memory op build (ds_ops.py)

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # what a launcher sets
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's view of the group run_ranks made
    torch.manual_seed(1000 + rank)
    ds_config = {"train_micro_batch_size_per_gpu": B if cached else K * B, "gradient_accumulation_steps": K if cached
                 else 1, "train_batch_size": K * B * world, "gradient_clipping": 0.0, "zero_allow_untested_optimizer":
                 True, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage == 3):
        head = _head(rank)
    torch.manual_seed(1000 + rank)  # the same dropout stream for both
    engine, *_ = deepspeed.initialize(model=head, config=ds_config,
                                      optimizer=torch.optim.AdamW(head.parameters(), lr=1e-2))
    engine.train()
    batches = _micro_batches(rank)
    loss_fn = _loss_fn("infonce", chunk)

    if cached:
        def backward(surrogate):
            engine.backward(surrogate, scale_wrt_gas=False)
            engine.step()

        out, _ = accumulated_backward(batches, lambda b: engine(b["x"], b["y"]), loss_fn, backward,
                                      head.random_modules())
    else:
        out = loss_fn(_one_graph([engine(b["x"], b["y"]) for b in batches]))
        engine.backward(out.loss)
        engine.step()
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        return {"loss": out.loss.item(), "params": {n: p.detach().clone() for n, p in params}}


@pytest.mark.parametrize("stage,world,chunk", [pytest.param(1, 2, None, marks=pytest.mark.slow),
                                               pytest.param(2, 1, 5, marks=pytest.mark.slow), (3, 2, 5)])
def test_engine_update_with_noise_dropout_and_mixup_equals_one_graph(tmp_path, stage, world, chunk):
    """The issue's equivalence inside DeepSpeed: the parameter update and the loss of one
    accumulated step equal those of the K micro-batches in one graph, under ZeRO 1, 2, 3."""
    reference = run_ranks(_engine_update, world, tmp_path, stage, chunk, False)
    (tmp_path / "cached").mkdir()
    accumulated = run_ranks(_engine_update, world, tmp_path / "cached", stage, chunk, True)
    for want, got in zip(reference, accumulated, strict=True):
        assert "error" not in want and "error" not in got, (want.get("traceback"), got.get("traceback"))
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        for name, value in want["params"].items():
            torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-7, msg=name)
