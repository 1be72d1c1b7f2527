import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from alignvl_scale.evaluation.metrics import Calibration, expected_calibration_error, retrieval_metrics


def brute_force(image_emb, text_emb, caption_to_image):
    """Rank every candidate by full sort, ties against the model, one query at a time.
    Each score is one float64 dot product of its two vectors alone, so equal vectors give
    equal scores."""
    scores = [[float(torch.dot(i.double(), t.double())) for t in text_emb] for i in image_emb]
    owner = caption_to_image.tolist()
    i2t, t2i = [], []
    for i, row in enumerate(scores):
        best = max(row[t] for t in range(len(owner)) if owner[t] == i)
        i2t.append(1 + sum(1 for t, s in enumerate(row) if owner[t] != i and s >= best))
    for t in range(len(owner)):
        mine = scores[owner[t]][t]
        t2i.append(1 + sum(1 for i in range(len(scores)) if i != owner[t] and scores[i][t] >= mine))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{name}_mean_rank"] = statistics.fmean(ranks)
        out[f"{name}_median_rank"] = statistics.median_low(ranks)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n_images = int(torch.randint(5, 30, (1,), generator=g))
    captions_per_image = torch.randint(1, 6, (n_images,), generator=g)
    caption_to_image = torch.repeat_interleave(torch.arange(n_images), captions_per_image)
    caption_to_image = caption_to_image[torch.randperm(len(caption_to_image), generator=g)]
    # Small integer embeddings make many exact ties.
    image_emb = torch.randint(-2, 3, (n_images, 3), generator=g).float()
    text_emb = torch.randint(-2, 3, (len(caption_to_image), 3), generator=g).float()
    got = retrieval_metrics(image_emb, text_emb, caption_to_image, chunk_size=4)
    want = brute_force(image_emb, text_emb, caption_to_image)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


def test_ties_count_against_the_model():
    image_emb = torch.ones(3, 2)  # every image scores the same
    text_emb = torch.ones(3, 2)
    m = retrieval_metrics(image_emb, text_emb, torch.arange(3))
    assert m["i2t_R@1"] == 0 and m["t2i_R@1"] == 0
    assert m["t2i_mean_rank"] == 3


def test_perfect_embeddings():
    image_emb = torch.eye(20)
    caption_to_image = torch.arange(20).repeat(5)
    m = retrieval_metrics(image_emb, image_emb[caption_to_image], caption_to_image, chunk_size=7)
    assert m["i2t_R@1"] == m["t2i_R@1"] == 100.0
    assert m["i2t_median_rank"] == m["t2i_median_rank"] == 1


def test_bad_metric_inputs():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dims differ"):
        retrieval_metrics(torch.eye(3), torch.ones(3, 2), torch.arange(3))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))


@pytest.mark.parametrize("seed", range(4))
def test_duplicated_images_and_captions_are_ties_against_the_model(seed):
    """Real-valued embeddings, every image and every caption present twice. Each query's
    correct key has an exact twin among the wrong ones, so R@1 must be 0 both ways, and the
    ranks must equal a brute force whose scores depend only on the two vectors. (Taking the
    positive's score from an elementwise product while its competitors come from a matmul
    rounds them differently and gave R@1 of 6-13% here.)"""
    g = torch.Generator().manual_seed(seed)
    n_images, dim = 40, 96
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    captions = torch.nn.functional.normalize(images.repeat_interleave(2, dim=0)
                                             + 0.7 * torch.randn(2 * n_images, dim, generator=g), dim=1)
    caption_to_image = torch.arange(n_images).repeat_interleave(2)
    # Image k + n is a copy of image k; caption j + 2n a copy of caption j, owned by the copy.
    image_emb = torch.cat([images, images])
    text_emb = torch.cat([captions, captions])
    caption_to_image = torch.cat([caption_to_image, caption_to_image + n_images])
    order = torch.randperm(len(text_emb), generator=g)  # twins land in different chunks
    text_emb, caption_to_image = text_emb[order], caption_to_image[order]
    got = retrieval_metrics(image_emb, text_emb, caption_to_image, chunk_size=33)
    assert got["i2t_R@1"] == 0 and got["t2i_R@1"] == 0
    want = brute_force(image_emb, text_emb, caption_to_image)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


def test_ece_on_a_hand_computed_case():
    """Two bins in use: bin [0.6, 0.667) holds confidences 0.6 and 0.62 (one right):
    |1 - 1.22| = 0.22; bin [0.933, 1] holds 0.95 and 1.0 (both right): |2 - 1.95| = 0.05.
    ECE = (0.22 + 0.05) / 4."""
    confidence = torch.tensor([0.6, 0.62, 0.95, 1.0])
    correct = torch.tensor([True, False, True, True])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.27 / 4)
    assert expected_calibration_error(torch.tensor([0.3, 0.9]), torch.tensor([False, True])) == pytest.approx(
        (0.3 + 0.1) / 2)


def test_calibration_on_a_hand_computed_case():
    """Two images, two captions, scores [[1, 0], [0.5, 0.5]] at logit scale ln 3:
    image 0's softmax is (3/4, 1/4): right, confidence 3/4, NLL ln(4/3); image 1's is
    (1/2, 1/2): a tie, wrong (ties count against the model), confidence 1/2, NLL ln 2."""
    image_emb = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    text_emb = torch.eye(2)
    m = retrieval_metrics(image_emb, text_emb, torch.arange(2), calibration=Calibration("softmax", math.log(3)))
    assert m["i2t_confidence"] == pytest.approx(100 * (0.75 + 0.5) / 2)
    assert m["i2t_nll"] == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)
    # bins: 0.75 alone (right): 0.25; 0.5 alone (wrong): 0.5
    assert m["i2t_ece"] == pytest.approx(100 * (0.25 + 0.5) / 2)
    assert "t2i_ece" in m and "i2t_ece" not in retrieval_metrics(image_emb, text_emb, torch.arange(2))


def test_calibration_matches_a_brute_force_softmax_with_several_captions_per_image():
    g = torch.Generator().manual_seed(4)
    image_emb = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    caption_to_image = torch.cat([torch.arange(20), torch.randint(0, 20, (17,), generator=g)])
    text_emb = F.normalize(image_emb[caption_to_image] + 0.7 * torch.randn(37, 8, generator=g), dim=1)
    scale = 14.3
    got = retrieval_metrics(image_emb, text_emb, caption_to_image, chunk_size=6,
                            calibration=Calibration("softmax", scale))
    owns = caption_to_image[None, :] == torch.arange(20)[:, None]  # image x caption
    for prefix, probs, correct_mask in (("i2t", (scale * image_emb @ text_emb.T).double().softmax(1), owns),
                                        ("t2i", (scale * text_emb @ image_emb.T).double().softmax(1), owns.T)):
        top = probs.max(dim=1)
        right = probs.masked_fill(~correct_mask, -1).amax(1) > probs.masked_fill(correct_mask, -1).amax(1)
        assert got[f"{prefix}_confidence"] == pytest.approx(100 * top.values.mean().item(), rel=1e-5)
        assert got[f"{prefix}_nll"] == pytest.approx(-(probs * correct_mask).sum(1).log().mean().item(), rel=1e-5)
        assert got[f"{prefix}_ece"] == pytest.approx(100 * expected_calibration_error(top.values, right), rel=1e-5)


def test_sigmoid_calibration_matches_a_brute_force_per_pair_reading_with_several_captions_per_image():
    """A sigmoid model's confidence is sigmoid(scale x s + bias) of its top-1 candidate; its
    NLL the binary NLL over every candidate (each caption of the image a positive)."""
    g = torch.Generator().manual_seed(5)
    image_emb = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    caption_to_image = torch.cat([torch.arange(20), torch.randint(0, 20, (17,), generator=g)])
    text_emb = F.normalize(image_emb[caption_to_image] + 0.7 * torch.randn(37, 8, generator=g), dim=1)
    scale, bias = 9.0, -4.5
    got = retrieval_metrics(image_emb, text_emb, caption_to_image, chunk_size=6,
                            calibration=Calibration("sigmoid", scale, bias))
    owns = caption_to_image[None, :] == torch.arange(20)[:, None]  # image x caption
    for prefix, logits, labels in (("i2t", scale * image_emb @ text_emb.T + bias, owns),
                                   ("t2i", scale * text_emb @ image_emb.T + bias, owns.T)):
        logits = logits.double()
        top = torch.sigmoid(logits.max(dim=1).values)
        right = logits.masked_fill(~labels, -1e9).amax(1) > logits.masked_fill(labels, -1e9).amax(1)
        nll = F.binary_cross_entropy_with_logits(logits, labels.double(), reduction="none").sum(1)
        assert got[f"{prefix}_confidence"] == pytest.approx(100 * top.mean().item(), rel=1e-5)
        assert got[f"{prefix}_nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
        assert got[f"{prefix}_ece"] == pytest.approx(100 * expected_calibration_error(top, right), rel=1e-5)


def test_the_reliability_diagram_holds_the_bins_its_ece_comes_from(tmp_path):
    """retrieval_metrics hands each direction's bins out; written as a diagram (PNG and JSON),
    the JSON's bins give back the metrics' ECE, and their counts, mean confidences and
    accuracies are those of the queries (a hand-checked case: 2 images, 2 captions)."""
    from alignvl_scale.evaluation.reliability import read_bins, write_reliability

    image_emb, text_emb = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.eye(2)
    bins = {}
    m = retrieval_metrics(image_emb, text_emb, torch.arange(2), calibration=Calibration("softmax", math.log(3)),
                          reliability=bins)
    write_reliability(tmp_path, "set", bins, "a test")
    assert (tmp_path / "set.png").stat().st_size > 5000
    data = json.loads((tmp_path / "set.json").read_text())
    for direction in ("i2t", "t2i"):
        assert data[direction]["ece_percent"] == pytest.approx(m[f"{direction}_ece"])
        assert read_bins(tmp_path / "set.json")[direction].ece() * 100 == pytest.approx(m[f"{direction}_ece"])
    filled = [b for b in data["i2t"]["bins"] if b["count"]]  # confidences 1/2 (wrong) and 3/4 (right)
    want = [(1, 0.5, 0.0), (1, pytest.approx(0.75), 1.0)]
    assert [(b["count"], b["confidence"], b["accuracy"]) for b in filled] == want
    merged = bins["i2t"].merged(bins["i2t"])
    assert merged.counts == [2 * n for n in bins["i2t"].counts] and merged.ece() == pytest.approx(bins["i2t"].ece())
