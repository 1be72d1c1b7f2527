import itertools

import pytest
import torch
import torch.nn.functional as F
from distributed import run_ranks

from alignvl_scale.losses.infonce import align_vl_loss, align_vl_loss_with_stats

N, DIM = 12, 8
CONFIGS = [(smoothing, chunk) for smoothing in (0.0, 0.3) for chunk in (None, 5, 3)]


def make_batch(n: int = N, dim: int = DIM, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1).float()
    v = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1).float()
    return u, v, torch.tensor([7.5])


def reference(u, v, scale, smoothing):
    """The single-process loss on the full N x N logits, by torch's own cross entropy."""
    u, v, scale = (t.clone().requires_grad_(True) for t in (u, v, scale))
    logits = scale * u @ v.T
    labels = torch.arange(len(u))
    loss = (F.cross_entropy(logits, labels, label_smoothing=smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=smoothing)) / 2
    loss.backward()
    return loss.detach(), u.grad, v.grad, scale.grad


def _rank_losses(rank, world, u, v, scale):
    b = len(u) // world
    rows = slice(rank * b, (rank + 1) * b)
    out = {}
    for smoothing, chunk in CONFIGS:
        lu, lv, ls = (t.clone().requires_grad_(True) for t in (u[rows], v[rows], scale))
        loss = align_vl_loss(lu, lv, ls, smoothing=smoothing, chunk_size=chunk)
        loss.backward()
        out[f"{smoothing}-{chunk}"] = {"loss": loss.detach(), "gu": lu.grad, "gv": lv.grad, "gs": ls.grad}
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def distributed_results(request, tmp_path_factory):
    world = request.param
    u, v, scale = make_batch()
    results = run_ranks(_rank_losses, world, tmp_path_factory.mktemp(f"loss{world}"), u, v, scale)
    return world, (u, v, scale), results


@pytest.mark.parametrize("smoothing,chunk", CONFIGS)
def test_gathered_loss_equals_full_batch(distributed_results, smoothing, chunk):
    world, (u, v, scale), results = distributed_results
    ref_loss, ref_gu, ref_gv, ref_gs = reference(u, v, scale, smoothing)
    per_rank = [r[f"{smoothing}-{chunk}"] for r in results]
    b = N // world
    for rank, r in enumerate(per_rank):
        torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-5, atol=1e-6)
        # Each rank's own-row gradient carries the sum over ranks; the engine's average divides it.
        rows = slice(rank * b, (rank + 1) * b)
        torch.testing.assert_close(r["gu"] / world, ref_gu[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["gv"] / world, ref_gv[rows], rtol=1e-5, atol=1e-7)
    mean_scale_grad = torch.stack([r["gs"] for r in per_rank]).mean(0)
    torch.testing.assert_close(mean_scale_grad, ref_gs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("smoothing,chunk", CONFIGS)
def test_single_process_matches_reference(smoothing, chunk):
    u, v, scale = make_batch(n=37, seed=1)
    ref_loss, ref_gu, ref_gv, ref_gs = reference(u, v, scale, smoothing)
    lu, lv, ls = (t.clone().requires_grad_(True) for t in (u, v, scale))
    loss = align_vl_loss(lu, lv, ls, smoothing=smoothing, chunk_size=chunk)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    for got, want in ((lu.grad, ref_gu), (lv.grad, ref_gv), (ls.grad, ref_gs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_zero_smoothing_is_the_clip_loss():
    u, v, scale = make_batch()
    logits = scale * u @ v.T
    log_p_i2t = logits.log_softmax(dim=1).diag()
    log_p_t2i = logits.log_softmax(dim=0).diag()
    clip = -(log_p_i2t.mean() + log_p_t2i.mean()) / 2
    torch.testing.assert_close(align_vl_loss(u, v, scale), clip)


def test_smoothing_changes_the_loss():
    u, v, scale = make_batch()
    assert not torch.allclose(align_vl_loss(u, v, scale, 0.0), align_vl_loss(u, v, scale, 0.5))


@pytest.mark.parametrize("chunk", [None, 5])
def test_in_batch_accuracy(chunk):
    u, _, scale = make_batch()
    v = u.clone()
    v[0], v[1] = u[1], u[0]  # pairs 0 and 1 swapped: 10 of 12 correct both ways
    out = align_vl_loss_with_stats(u, v, scale, chunk_size=chunk)
    assert out.i2t_accuracy.item() == pytest.approx(10 / 12)
    assert out.t2i_accuracy.item() == pytest.approx(10 / 12)


@pytest.mark.parametrize("chunk", [None, 5])
def test_a_tie_counts_against_the_model_on_both_paths_as_in_evaluation(chunk):
    """Every pair of an all-equal batch ties with every other: 0 correct (the plain path's
    argmax said 1/8, the fused path's >= said 1)."""
    u = torch.nn.functional.normalize(torch.ones(8, 4), dim=-1)
    out = align_vl_loss_with_stats(u, u.clone(), torch.tensor([10.0]), chunk_size=chunk)
    assert out.i2t_accuracy.item() == 0.0 and out.t2i_accuracy.item() == 0.0


def test_chunked_memory_path_is_bf16_safe():
    u, v, scale = make_batch()
    loss = align_vl_loss(u.bfloat16(), v.bfloat16(), scale, smoothing=0.1, chunk_size=4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def _relative_errors(got, want) -> list[float]:
    return [((g - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True)]


@pytest.mark.parametrize("scale", [1 / 0.07, 100.0])
def test_low_precision_tiles_stay_within_1e_3_of_the_fp32_reference(scale, monkeypatch):
    """Values and gradients of the fused path in bf16 (and tf32, fp32 on CPU) against the
    fp32 plain reference, at the initial and at the capped temperature. Plain bf16 products
    (one rounding of each operand) miss the bound; the split products meet it."""
    import alignvl_scale.losses.infonce as loss_module
    u, v, _ = make_batch(n=256, dim=64, seed=2)
    v = F.normalize(u + 0.5 * v, dim=1)  # aligned pairs: a confident softmax, as late in training
    want = reference(u, v, torch.tensor([scale]), 0.2)

    def fused(precision):
        lu, lv, ls = (t.clone().requires_grad_(True) for t in (u, v, torch.tensor([scale])))
        loss = align_vl_loss(lu, lv, ls, smoothing=0.2, chunk_size=48, matmul_precision=precision)
        loss.backward()
        return loss.detach(), lu.grad, lv.grad, ls.grad

    for precision in ("bf16", "tf32"):
        assert max(_relative_errors(fused(precision), want)) < 1e-3, precision
    monkeypatch.setattr(loss_module, "tile_matmul", lambda a, b, _: a.bfloat16().float() @ b.bfloat16().float())
    assert max(_relative_errors(fused("bf16"), want)) > 1e-3


def confident_batch(seed: int, n: int, dim: int):
    """Unit rows V = normalize(U + 0.7 noise): pairs a CLIP model at scale 50-100 is sure of."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    return u, F.normalize(u + 0.7 * torch.randn(n, dim, generator=g), dim=1)


# (seed, N, dim, chunk, scale): issue 44's two cases (57% off and the wrong sign before), then
# N from 1 to 64 over 1-3 ranks (N divisible by each world), tiles smaller than a rank's rows.
CONFIDENT_CASES = [(17, 5, 8, 2, 100.0), (1, 2, 3, 2, 81.22)] + [
    (seed, n, 8, 4, scale) for seed, n in enumerate((1, 6, 12, 30, 42, 64)) for scale in (50.0, 100.0)]
UPSTREAM = (1.0, -1.0, 2.0, 0.5)


def _rank_confident_gradients(rank, world, cases):
    """Each case's (loss x upstream) gradients of this rank's rows and the scale, plain and
    fused, for smoothing 0 and 0.2; the rows' share carries the sum over ranks (see tiles.py)."""
    out = {}
    for seed, n, dim, chunk, scale in cases:
        if n % world:
            continue
        u, v = confident_batch(seed, n, dim)
        b = n // world
        for smoothing, path, upstream in itertools.product((0.0, 0.2), (None, chunk), UPSTREAM):
            lu, lv = (t[rank * b:(rank + 1) * b].clone().requires_grad_(True) for t in (u, v))
            ls = torch.tensor([scale], requires_grad=True)
            (upstream * align_vl_loss(lu, lv, ls, smoothing=smoothing, chunk_size=path)).backward()
            out[f"{seed}-{n}-{smoothing}-{path}-{upstream}"] = (torch.cat([lu.grad, lv.grad]) / world, ls.grad)
    return out


def _check_confident_gradients(world, per_rank):
    """Against float64: the fused path's error at most twice the plain fp32 path's on the
    same batch, or 1e-5 of the largest entry, for the rows and for the scale; dL/dscale of
    the right sign. Smoothing is left out at N = 1, where it does not change the target: the
    loss is 0 and the plain path's gradient exactly 0, the fused path's a rounding of terms
    of size alpha x scale (its means' share cancels its positives')."""
    checked = 0
    for seed, n, dim, chunk, scale in CONFIDENT_CASES:
        if n % world:
            continue
        u, v = confident_batch(seed, n, dim)
        b = n // world
        for smoothing, upstream in itertools.product((0.0, 0.2) if n > 1 else (0.0,), UPSTREAM):
            _, gu, gv, gs = (t * upstream for t in reference(u.double(), v.double(), torch.tensor([scale]).double(),
                                                             smoothing))
            key = f"{seed}-{n}-{smoothing}-{{}}-{upstream}"
            plain_s = torch.stack([r[key.format(None)][1] for r in per_rank]).mean(0).double()
            fused_s = torch.stack([r[key.format(chunk)][1] for r in per_rank]).mean(0).double()
            for rank, r in enumerate(per_rank):
                want = torch.cat([gu[rank * b:(rank + 1) * b], gv[rank * b:(rank + 1) * b]])
                plain, fused = (r[key.format(path)][0].double() for path in (None, chunk))
                bound = max(2 * (plain - want).abs().max(), 1e-5 * want.abs().max())
                assert (fused - want).abs().max() <= bound, (seed, n, smoothing, upstream, rank)
            bound = max(2 * (plain_s - gs).abs().max(), 1e-5 * gs.abs().max())
            assert (fused_s - gs).abs().max() <= bound, (seed, n, smoothing, upstream, fused_s, gs)
            assert torch.sign(fused_s) == torch.sign(gs), (seed, n, smoothing, upstream)
            checked += 1
    return checked


def test_fused_gradients_at_clip_temperatures_as_exact_as_the_plain_path():
    """Issue 44: confident batches at scale 50-100, one process, the upstream gradient 1, -1,
    2 and 0.5 (the backward once folded positive ones into an fp32 shift of the scale's size)."""
    assert _check_confident_gradients(1, [_rank_confident_gradients(0, 1, CONFIDENT_CASES)]) == 14 * 8 - 2 * 4


@pytest.mark.parametrize("world", [2, 3])
def test_fused_gradients_at_clip_temperatures_on_several_ranks(world, tmp_path):
    per_rank = run_ranks(_rank_confident_gradients, world, tmp_path, CONFIDENT_CASES)
    assert _check_confident_gradients(world, per_rank) > 0


def test_one_exponential_per_element_only_where_it_is_exact(monkeypatch):
    """At the capped scale, a batch whose texts' best scores lie 170 apart (texts matched at
    cos ~1 beside texts at cos ~-0.7 with every image): the fused path still equals the
    float64 reference, one exponential per element or two (ONE_EXP_SPREAD forced either
    way), and only because it takes the second where the first would underflow."""
    import alignvl_scale.losses.infonce as loss_module
    g = torch.Generator().manual_seed(5)
    axis = torch.zeros(16)
    axis[0] = 1.0
    u = F.normalize(0.8 * axis + 0.3 * torch.randn(64, 16, generator=g), dim=1)
    lonely = F.normalize(-axis + 0.2 * torch.randn(64, 16, generator=g), dim=1)
    v = torch.where(torch.arange(64)[:, None] % 2 == 0, u, lonely)  # in every tile, both kinds
    scale = torch.tensor([100.0])
    want = [t.float() for t in reference(u.double(), v.double(), scale.double(), 0.1)]

    def fused():
        lu, lv, ls = (t.clone().requires_grad_(True) for t in (u, v, scale))
        loss = align_vl_loss(lu, lv, ls, smoothing=0.1, chunk_size=16)
        loss.backward()
        return loss.detach(), lu.grad, lv.grad, ls.grad

    for spread in (loss_module.ONE_EXP_SPREAD, -1.0):  # as shipped; always two exponentials
        monkeypatch.setattr(loss_module, "ONE_EXP_SPREAD", spread)
        assert max(_relative_errors(fused(), want)) < 1e-5, spread
    monkeypatch.setattr(loss_module, "ONE_EXP_SPREAD", float("inf"))  # one exponential everywhere
    try:  # the columns' sums underflow, and the factor back to their own maxima overflows
        assert not max(_relative_errors(fused(), want)) < 1e-5
    except FloatingPointError:
        pass


def test_fused_path_computes_each_tile_once_per_pass(monkeypatch):
    """Both directions from one pass: one product per chunk x chunk tile forward, and per tile
    one recomputation plus the two gradient products in backward; no tile larger."""
    import alignvl_scale.losses.infonce as loss_module
    shapes = []
    real = loss_module.tile_matmul
    monkeypatch.setattr(loss_module, "tile_matmul", lambda a, b, p: shapes.append((a.shape[0], b.shape[1]))
                        or real(a, b, p))
    u, v, scale = (t.clone().requires_grad_(True) for t in make_batch())
    loss = align_vl_loss(u, v, scale, smoothing=0.3, chunk_size=5)
    assert len(shapes) == 3 * 3  # N = 12 in rows and columns of 5, 5, 2
    assert max(max(shape) for shape in shapes) <= 5
    loss.backward()
    assert len(shapes) == 9 + 9 * 3


@pytest.mark.parametrize("kwargs,match", [
    ({"smoothing": 1.0}, "smoothing"),
    ({"smoothing": -0.1}, "smoothing"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 4, "matmul_precision": "fp16"}, "matmul_precision"),
    ({"matmul_precision": "bf16"}, "fp32 unless chunk_size is set"),
])
def test_bad_arguments(kwargs, match):
    u, v, scale = make_batch()
    with pytest.raises(ValueError, match=match):
        align_vl_loss(u, v, scale, **kwargs)


def test_dims_must_match():
    u, v, scale = make_batch()
    with pytest.raises(ValueError, match="equal shapes"):
        align_vl_loss(u, v[:, :4], scale)
    with pytest.raises(ValueError, match="equal shapes"):
        align_vl_loss(u, v[:5], scale)


def test_non_finite_embeddings():
    u, v, scale = make_batch()
    u[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        align_vl_loss(u, v, scale)


def _raised(fn) -> str:
    try:
        fn()
    except (ValueError, FloatingPointError) as exc:
        return str(exc)
    return "no error"


def _bad_rank_inputs(rank, world):
    u, v, scale = make_batch()
    b = 4 if rank == 0 else 5
    sizes = _raised(lambda: align_vl_loss(u[:b], v[:b], scale))  # unequal local batches
    if rank == 1:
        u[0, 0] = float("inf")  # bad on one rank only
    finite = _raised(lambda: align_vl_loss(u, v, scale))
    return {"sizes": sizes, "finite": finite}


def test_bad_inputs_raise_on_every_rank(tmp_path):
    """A bad batch on one rank must raise on all of them, or the others hang."""
    for r in run_ranks(_bad_rank_inputs, 2, tmp_path):
        assert "local batch sizes differ across ranks: [4, 5]" in r["sizes"], r
        assert "non-finite" in r["finite"], r
