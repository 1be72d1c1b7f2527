import statistics

import pytest
import torch

from alignvl_scale.metrics import retrieval_metrics


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
