import math

import pytest
import torch

from alignvl_scale.config import MAX_LOGIT_SCALE
from alignvl_scale.data.streams import RowKeys
from alignvl_scale.losses.registry import OBJECTIVES
from alignvl_scale.model.head import AlignVLHead, LatentMixup, RandomPerturbation
from alignvl_scale.model.portable import Temperature, build_adapter


def test_zero_sigma_and_no_mixup_are_identities():
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    assert RandomPerturbation(0.0)(x) is x
    mx, my = LatentMixup("off")(x, y)
    assert mx is x and my is y


@pytest.mark.parametrize("sigma", [0.01, 0.5])
def test_absolute_noise_matches_sigma(sigma):
    x = torch.randn(2000, 256)
    noise = RandomPerturbation(sigma, seed=3)(x) - x
    assert noise.mean().abs() < 5 * sigma / math.sqrt(noise.numel())
    assert noise.std().item() == pytest.approx(sigma, rel=0.01)


def test_relative_noise_scales_with_rms():
    x = 10 * torch.randn(1000, 128)
    rp = RandomPerturbation(0.1, mode="relative", seed=0)
    noise = rp(x) - x
    rms = x.pow(2).mean(dim=-1).sqrt().mean()
    assert noise.std().item() == pytest.approx(0.1 * rms.item(), rel=0.02)


def test_eval_mode_adds_no_noise_and_no_mixup():
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    rp, mix = RandomPerturbation(0.5).eval(), LatentMixup("fusemix").eval()
    assert torch.equal(rp(x), x)
    mx, my = mix(x, y)
    assert torch.equal(mx, x) and torch.equal(my, y)


def test_noise_is_reproducible_and_independent_per_rank_and_modality():
    x = torch.randn(4, 32)
    heads = [AlignVLHead(32, 32, 8, noise_sigma=0.1, seed=7, rank=r) for r in (0, 0, 1)]
    a, b, c = (h.image_noise(x) for h in heads)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(heads[0].image_noise(x) - x, heads[0].text_noise(x) - x)


def test_rng_state_round_trip():
    x = torch.randn(4, 32)
    rp = RandomPerturbation(0.1, seed=1)
    rp(x)
    state = rp.rng_state()
    expected = rp(x)
    fresh = RandomPerturbation(0.1, seed=1)
    fresh.load_rng_state(state)
    assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("mode", ["fusemix", "permutation"])
def test_mixup_keeps_pairs_aligned(mode):
    # y is a fixed linear map of x: any shared (lam, partners) keeps y_mixed = A x_mixed.
    a = torch.randn(16, 16)
    x = torch.randn(32, 16)
    mx, my = LatentMixup(mode, 0.4, seed=5)(x, x @ a.T)
    assert mx.shape == (16 if mode == "fusemix" else 32, 16)
    torch.testing.assert_close(my, mx @ a.T, rtol=1e-4, atol=1e-5)


def test_fusemix_mixes_the_first_half_with_the_second():
    """FuseMix's batch arithmetic: B rows -> B/2, row i = lam x_i + (1 - lam) x_{i + B/2}
    with one lam for the batch and both modalities; every input row is used exactly once."""
    b = 8
    x = torch.arange(b, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 10.0]])  # row i = (i, 10 i)
    y = -3 * x
    mix = LatentMixup("fusemix", 1.0, seed=2)
    mx, my = mix(x, y)
    assert mx.shape == my.shape == (b // 2, 2)
    lam = 1 - mx[0, 0].item() / (b // 2)  # row 0 = lam * 0 + (1 - lam) * (B/2)
    assert 0 < lam < 1
    expected = lam * x[: b // 2] + (1 - lam) * x[b // 2:]
    torch.testing.assert_close(mx, expected)
    torch.testing.assert_close(my, -3 * expected)
    with pytest.raises(ValueError, match="even share"):
        mix(x[:7], y[:7])


@pytest.mark.parametrize("mode", ["fusemix", "permutation"])
def test_mixup_lambda_is_beta_distributed(mode):
    """Beta(2, 2): mean 1/2, variance 1/20 (FuseMix's default is Beta(1, 1))."""
    x = torch.zeros(2, 1)
    x[1] = 1.0  # fusemix: x_mixed[0] = 1 - lam; permutation: 1 - lam when it swaps, else 0
    mix = LatentMixup(mode, 2.0, seed=0)
    lams = []
    for _ in range(4000):
        mx, _ = mix(x, x)
        if mx[0, 0] != 0:
            lams.append(1 - mx[0, 0].item())
    lams = torch.tensor(lams)
    assert lams.mean().item() == pytest.approx(0.5, abs=0.02)
    assert lams.var().item() == pytest.approx(1 / 20, rel=0.15)  # Beta(2, 2) variance


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="sigma"):
        RandomPerturbation(-0.1)
    with pytest.raises(ValueError, match="noise mode"):
        RandomPerturbation(0.1, mode="gaussian")
    with pytest.raises(ValueError, match="mixup alpha"):
        LatentMixup("fusemix", 0.0)
    with pytest.raises(ValueError, match="mixup mode"):
        LatentMixup("halves")
    with pytest.raises(ValueError, match="adapter kind"):
        build_adapter("transformer", 4, 4)


def test_temperature_is_1d_and_clamped_in_forward():
    t = Temperature(1 / 0.07, MAX_LOGIT_SCALE)
    assert t.log_scale.shape == (1,)
    assert t().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        t.log_scale.fill_(10.0)
    assert t().item() == MAX_LOGIT_SCALE
    assert t.log_scale.item() == 10.0  # the parameter itself is untouched


@pytest.mark.parametrize("adapter", ["mlp", "linear"])
def test_head_runs_in_fp32_on_bf16_tower_outputs_under_autocast(adapter):
    head = AlignVLHead(24, 40, 16, adapter=adapter, noise_sigma=0.05, mixup="permutation", mixup_alpha=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, v, scale, bias = head(torch.randn(6, 24, dtype=torch.bfloat16), torch.randn(6, 40, dtype=torch.bfloat16))
    assert u.dtype == v.dtype == scale.dtype == torch.float32
    assert u.shape == v.shape == (6, 16) and scale.shape == (1,) and bias is None
    torch.testing.assert_close(u.norm(dim=1), torch.ones(6))


@pytest.mark.parametrize("objective,scale,bias", [("infonce", 1 / 0.07, None), ("siglip", 10.0, -10.0)])
def test_the_objective_sets_the_heads_scalars(objective, scale, bias):
    """The registry's initial values (open_clip's SigLIP: scale 10, bias -10), overridable;
    only objectives with a bias have the parameter (an InfoNCE checkpoint's keys are unchanged)."""
    head = AlignVLHead(4, 4, 4, objective=OBJECTIVES[objective])
    out = head(torch.randn(2, 4), torch.randn(2, 4))
    assert out.logit_scale.item() == pytest.approx(scale, rel=1e-5)
    assert (out.logit_bias is None) == (bias is None)
    assert ("logit_bias.value" in head.state_dict()) == (bias is not None)
    if bias is not None:
        assert out.logit_bias.item() == bias and out.logit_bias.dtype == torch.float32
        again = AlignVLHead(4, 4, 4, objective=OBJECTIVES[objective], logit_scale_init=3.0, logit_bias_init=-2.0)
        assert again.temperature().item() == pytest.approx(3.0) and again.logit_bias().item() == -2.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_noise_on_low_precision_features_keeps_its_level(dtype):
    """sigma = 0.01 on features of magnitude ~4: below bf16's resolution there (2**-6), so
    noise added and cast back to bf16 would mostly vanish. The noise actually added (output
    minus input) must have RMS sigma within 2%."""
    x = (4 + torch.rand(512, 256, generator=torch.Generator().manual_seed(0))).to(dtype)
    rp = RandomPerturbation(0.01, seed=3)
    added = rp(x) - x.float()
    assert added.pow(2).mean().sqrt().item() == pytest.approx(0.01, rel=0.02)


def test_temperature_above_the_maximum_comes_back_when_the_loss_asks():
    """A plain clamp has zero gradient above the limit: an overshooting scale stays there."""
    t = Temperature(1 / 0.07, MAX_LOGIT_SCALE)
    with torch.no_grad():
        t.log_scale.fill_(math.log(120.0))
    optimizer = torch.optim.AdamW(t.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(20):  # a loss that wants a smaller scale
        optimizer.zero_grad()
        t().sum().backward()
        optimizer.step()
    assert t.log_scale.exp().item() < MAX_LOGIT_SCALE < 120.0
    # Above the limit, a gradient that would raise the scale further is dropped.
    with torch.no_grad():
        t.log_scale.fill_(math.log(120.0))
    t.log_scale.grad = None
    (-t()).sum().backward()
    assert t.log_scale.grad.item() == 0.0


@pytest.mark.parametrize("mixup", ["fusemix", "permutation"])
def test_every_draw_of_the_head_is_keyed_by_the_sample_not_the_rank(mixup):
    """6 data streams' shares of 4 rows: one head computing all 24 rows, and heads of other
    ranks (other rank seeds) computing 3 + 3 or 2 + 2 + 2 streams, give the same rows (mixup
    partners and lambdas, noise, dropout masks all drawn per stream); another micro-batch
    draws otherwise; and without keys the head still draws from its own generators."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 12), torch.randn(24, 10)

    def head(rank: int) -> AlignVLHead:
        torch.manual_seed(1)  # the same weights on every rank
        return AlignVLHead(12, 10, 8, dropout=0.3, noise_sigma=0.2, mixup=mixup, seed=5, rank=rank).train()

    whole = head(0)(x, y, RowKeys(2, 7, 0, 6))
    for ranks in (2, 3):
        per, rows = 6 // ranks, 24 // ranks
        parts = [head(r)(x[r * rows:(r + 1) * rows], y[r * rows:(r + 1) * rows], RowKeys(2, 7, r * per, per))
                 for r in range(ranks)]
        torch.testing.assert_close(torch.cat([p.image for p in parts]), whole.image, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p.text for p in parts]), whole.text, rtol=0, atol=0)
    assert not torch.equal(head(0)(x, y, RowKeys(2, 8, 0, 6)).image, whole.image)
    assert not torch.equal(head(0)(x, y).image, head(1)(x, y).image)  # no keys: the rank's own streams
