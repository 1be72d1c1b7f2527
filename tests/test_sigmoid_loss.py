"""The sigmoid objective against full-matrix references, on 1, 2 and 3 ranks."""

import pytest
import torch
import torch.nn.functional as F
from distributed import run_ranks

import alignvl_scale.losses.sigmoid as sigmoid_module
import alignvl_scale.losses.tiles as tiles_module
from alignvl_scale.losses.sigmoid import sigmoid_loss, sigmoid_loss_with_stats

N, DIM = 12, 8
# chunk 5 cuts 6 local columns into 5 + 1 and 4 into one tile; 3 cuts 4 into 3 + 1
CONFIGS = [(smoothing, chunk) for smoothing in (0.0, 0.3) for chunk in (None, 5, 3)]


def make_batch(n: int = N, dim: int = DIM, seed: int = 0, aligned: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1).float()
    v = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1).float()
    v = F.normalize(aligned * u + v, dim=1)
    return u, v, torch.tensor([7.5]), torch.tensor([-3.0])


def open_clip_siglip(u, v, scale, bias):
    """open_clip's SigLipLoss on one process: labels +1 on the pairs, -1 elsewhere, summed
    over the N x N pairs and divided by the batch."""
    logits = scale * u @ v.T + bias
    labels = 2 * torch.eye(len(u)) - 1
    return -F.logsigmoid(labels * logits).sum() / len(u)


def reference(u, v, scale, bias, smoothing):
    """The N x N soft-target binary cross entropy by torch's own function, and its gradients."""
    u, v, scale, bias = (t.clone().double().requires_grad_(True) for t in (u, v, scale, bias))
    logits = scale * u @ v.T + bias
    n = len(u)
    targets = (1 - smoothing) * torch.eye(n, dtype=torch.float64) + smoothing / n
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / n
    loss.backward()
    return [t.float() for t in (loss.detach(), u.grad, v.grad, scale.grad, bias.grad)]


def _with_grads(u, v, scale, bias, **kwargs):
    u, v, scale, bias = (t.clone().requires_grad_(True) for t in (u, v, scale, bias))
    loss = sigmoid_loss(u, v, scale, bias, **kwargs)
    loss.backward()
    return [loss.detach(), u.grad, v.grad, scale.grad, bias.grad]


def test_zero_smoothing_is_open_clips_siglip_loss():
    u, v, scale, bias = make_batch()
    want = open_clip_siglip(u, v, scale, bias)
    for chunk in (None, 5):
        torch.testing.assert_close(sigmoid_loss(u, v, scale, bias, chunk_size=chunk), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("smoothing,chunk", CONFIGS)
def test_single_process_matches_reference(smoothing, chunk):
    u, v, scale, bias = make_batch(aligned=1.0)
    got = _with_grads(u, v, scale, bias, smoothing=smoothing, chunk_size=chunk)
    for g, w in zip(got, reference(u, v, scale, bias, smoothing), strict=True):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=1e-5, atol=1e-6)


def _rank_losses(rank, world, u, v, scale, bias):
    b = len(u) // world
    rows = slice(rank * b, (rank + 1) * b)
    out = {}
    for smoothing, chunk in CONFIGS:
        stats = sigmoid_loss_with_stats(u[rows], v[rows], scale, bias, smoothing=smoothing, chunk_size=chunk)
        loss, gu, gv, gs, gb = _with_grads(u[rows], v[rows], scale, bias, smoothing=smoothing, chunk_size=chunk)
        out[f"{smoothing}-{chunk}"] = {"loss": loss, "gu": gu, "gv": gv, "gs": gs, "gb": gb,
                                      "acc": torch.stack([stats.i2t_accuracy, stats.t2i_accuracy])}
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def distributed_results(request, tmp_path_factory):
    world = request.param
    batch = make_batch(aligned=1.0)
    return world, batch, run_ranks(_rank_losses, world, tmp_path_factory.mktemp(f"sigmoid{world}"), *batch)


def _brute_force_accuracy(u, v, scale, bias):
    """Pairs scoring strictly above every other candidate of their row / column."""
    z = scale * u @ v.T + bias
    positive = z.diagonal()
    others = z - torch.diag(torch.full((len(u),), float("inf")))
    return torch.stack([(positive > others.amax(1)).float().mean(), (positive > others.amax(0)).float().mean()])


@pytest.mark.parametrize("smoothing,chunk", CONFIGS)
def test_gathered_loss_equals_full_batch(distributed_results, smoothing, chunk):
    world, (u, v, scale, bias), results = distributed_results
    ref_loss, ref_gu, ref_gv, ref_gs, ref_gb = reference(u, v, scale, bias, smoothing)
    per_rank = [r[f"{smoothing}-{chunk}"] for r in results]
    b = N // world
    accuracy = _brute_force_accuracy(u, v, scale, bias)
    assert 0 < accuracy.min() and accuracy.max() < 1  # a batch that tells right from wrong counts
    for rank, r in enumerate(per_rank):
        torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-5, atol=1e-6)
        rows = slice(rank * b, (rank + 1) * b)  # own rows carry the sum over ranks (loss.py)
        torch.testing.assert_close(r["gu"] / world, ref_gu[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["gv"] / world, ref_gv[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["acc"], accuracy)
    for key, want in (("gs", ref_gs), ("gb", ref_gb)):
        torch.testing.assert_close(torch.stack([r[key] for r in per_rank]).mean(0), want.reshape(1),
                                   rtol=1e-5, atol=1e-7)


def _replace_tile_matmul(patch, fake) -> None:
    """Forward's tiles (losses/sigmoid.py) and backward's (tiles.tiled_backward)."""
    for module in (sigmoid_module, tiles_module):
        patch.setattr(module, "tile_matmul", fake)


def test_bf16_tiles_stay_within_1e_3_of_the_fp32_reference(monkeypatch):
    """Values and gradients (embeddings, scale, bias) with the split-bf16 tile products, at
    the initial SigLIP scale and bias and at the capped scale; plain bf16 products miss."""
    u, v, _, _ = make_batch(n=256, dim=64, seed=2, aligned=2.0)
    for scale, bias in ((10.0, -10.0), (100.0, -20.0)):
        s, b = torch.tensor([scale]), torch.tensor([bias])
        want = reference(u, v, s, b, 0.2)

        def errors(s=s, b=b, want=want):
            got = _with_grads(u, v, s, b, smoothing=0.2, chunk_size=48, matmul_precision="bf16")
            return [((g.reshape(w.shape) - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True)]

        assert max(errors()) < 1e-3, scale
    with monkeypatch.context() as patch:
        _replace_tile_matmul(patch, lambda a, b, _, add=None: a.bfloat16().float() @ b.bfloat16().float() + (
            0 if add is None else add))
        assert max(errors()) > 1e-3


def test_fused_path_keeps_memory_linear_in_the_batch(monkeypatch):
    """No tile larger than chunk x chunk, and three products per tile, all in forward: the
    fused path never holds B x N logits and recomputes nothing."""
    shapes = []
    real = tiles_module.tile_matmul
    _replace_tile_matmul(monkeypatch, lambda a, b, p, add=None: shapes.append((a.shape[0], b.shape[-1]))
                         or real(a, b, p, add))
    u, v, scale, bias = (t.clone().requires_grad_(True) for t in make_batch(n=64))
    loss = sigmoid_loss(u, v, scale, bias, smoothing=0.1, chunk_size=16)
    assert len(shapes) == 16 * 3  # 4 x 4 tiles
    assert max(rows for rows, _ in shapes) <= 16 and max(cols for _, cols in shapes) <= 16
    loss.backward()
    assert len(shapes) == 16 * 3


def test_confident_positives_keep_their_exact_gradient():
    """At z = scale u.v + bias >= 17 the naive sigmoid(z) - 1 is 0 in fp32; the loss and its
    gradients follow the float64 reference there too (the positive's exact forms)."""
    noise = torch.randn(16, 16, generator=torch.Generator().manual_seed(4)) * 0.01
    u, v = torch.eye(16), F.normalize(torch.eye(16) + noise, dim=1)  # pairs at cos ~1, others at ~0
    scale, bias = torch.tensor([40.0]), torch.tensor([-20.0])
    assert (scale * (u * v).sum(1) + bias).min() > 17
    want = reference(u, v, scale, bias, 0.0)
    assert 0 < want[1].abs().max() < 1e-6  # tiny gradients: the exp(-|z|) tails
    for chunk in (None, 5):
        got = _with_grads(u, v, scale, bias, chunk_size=chunk)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.reshape(w.shape), w, rtol=1e-4, atol=1e-12)


def test_non_finite_bias_raises():
    u, v, scale, _ = make_batch()
    with pytest.raises(FloatingPointError, match="logit_bias"):
        sigmoid_loss(u, v, scale, torch.tensor([float("nan")]), chunk_size=4)
