"""Randomness keyed by the sample inside trainable towers (alignvl_scale/model/keyed.py): a
tower's dropout (hidden, attention, LoRA's) draws the same masks for a row whatever rank,
world and layout computes it, in eager and SDPA attention alike, in an activation
checkpoint's recomputation too, and differently from one micro-batch to the next."""

import pytest
import torch

from alignvl_scale.config import DataConfig, LoraSettings, TowerConfig
from alignvl_scale.data.streams import RowKeys
from alignvl_scale.data.synthetic import make_tiny_towers
from alignvl_scale.model.keyed import tower_draws
from alignvl_scale.model.towers import build_preprocessing, build_tower

DATA = DataConfig(image_size=16)
CAPTIONS = ["a cat", "a small red bicycle leaning on a wall", "two dogs playing in the snow at dusk", "a boat",
            "an old map", "three green apples"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return make_tiny_towers(tmp_path_factory.mktemp("towers"))


def _tower(path: str, attention: str = "sdpa", **settings) -> tuple[torch.nn.Module, dict]:
    cfg = TowerConfig(name=path, trainable=True, max_length=12, **settings)
    torch.manual_seed(0)  # LoRA's initial A
    tower = build_tower(cfg, "text", DATA).train()
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "lora_B" in name:  # trained away from 0, so that what LoRA's dropout drops shows
                param.copy_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    tower.model.set_attn_implementation(attention)
    return tower, build_preprocessing(cfg, "text", DATA)(CAPTIONS)


def _features(tower, tokens: dict, rows: RowKeys, keep: slice = slice(None)) -> torch.Tensor:
    with tower_draws(rows, 7, "dropout.text_tower"):
        return tower(**{k: v[keep] for k, v in tokens.items()})


def _split(tower, tokens: dict, epoch: int = 0, index: int = 0) -> torch.Tensor:
    """The 6 rows as 3 ranks of 2 streams' shares of 1 row would compute them."""
    return torch.cat([_features(tower, tokens, RowKeys(epoch, index, 2 * r, 2), slice(2 * r, 2 * r + 2))
                      for r in range(3)])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_bert_towers_dropout_is_the_same_on_any_layout(towers, attention):
    """BERT's hidden and attention dropout (0.1 each): one process with 6 streams and 3 ranks of
    2 give the same features row for row; another micro-batch other masks; torch's own dropout
    (no keys) other features on every call."""
    tower, tokens = _tower(towers["bert"], attention)
    whole = _features(tower, tokens, RowKeys(0, 0, 0, 6))
    torch.testing.assert_close(_split(tower, tokens), whole, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_features(tower, tokens, RowKeys(0, 1, 0, 6)), whole, atol=1e-3)
    unkeyed = [tower(**tokens) for _ in range(2)]
    assert not torch.allclose(unkeyed[0], unkeyed[1], atol=1e-3)
    with torch.no_grad():
        tower.eval()
        assert not torch.allclose(tower(**tokens), whole, atol=1e-3)  # the keyed masks dropped something


def test_eager_and_sdpa_attention_draw_the_same_masks(towers):
    sdpa, tokens = _tower(towers["bert"], "sdpa")
    eager, _ = _tower(towers["bert"], "eager")
    torch.testing.assert_close(_features(sdpa, tokens, RowKeys(2, 5, 0, 6)),
                               _features(eager, tokens, RowKeys(2, 5, 0, 6)), rtol=1e-5, atol=1e-6)


def test_lora_dropout_and_checkpointing_recompute_the_same_masks(towers):
    """A LoRA Llama tower (LoRA dropout 0.3) with activation checkpointing: the same features on
    any layout, and the same gradients as without checkpointing (the recomputation replays the
    block's draws)."""
    lora = {"finetune": "lora", "lora": LoraSettings(rank=4, dropout=0.3), "padding_side": "left"}
    grads = []
    for checkpointing in (False, True):
        tower, tokens = _tower(towers["llama"], gradient_checkpointing=checkpointing, **lora)
        whole = _features(tower, tokens, RowKeys(1, 2, 0, 6))
        torch.testing.assert_close(_split(tower, tokens, 1, 2).detach(), whole.detach(), rtol=1e-5, atol=1e-6)
        (whole * torch.linspace(-1, 1, whole.numel()).reshape(whole.shape)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.allclose(_features(tower, tokens, RowKeys(1, 3, 0, 6)), whole, atol=1e-4)
