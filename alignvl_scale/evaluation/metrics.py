"""Image-text retrieval recall with the multi-caption protocol, by chunked exact ranking.

An image has one or more captions (`caption_to_image[t]` names caption t's image).
- image -> text: the rank of an image is that of its best-scoring caption; R@K is a hit
  when some caption of the image is in the top K.
- text -> image: exactly one correct image per caption.
Ties count against the model: every wrong candidate scoring >= the correct one is ranked
ahead of it. For that to hold on duplicated images or captions, the correct and the wrong
scores come out of the same computation: the same (query chunk x key chunk) tiles, each
tile a float64 product rounded to float32, so that equal dot products are equal numbers
whatever order the matrix multiply summed them in. Tiles keep 100k images x 500k captions
from ever materializing as one matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

RECALL_KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")


def recall_key(direction: str, k: int) -> str:
    """The one spelling of a recall metric's key: i2t_R@1, ..., t2i_R@10."""
    return f"{direction}_R@{k}"


RECALL_KEYS = [recall_key(d, k) for d in DIRECTIONS for k in RECALL_KS]


def _score_tiles(queries: Tensor, keys: Tensor, chunk: int):
    """(start, scores of queries against keys[start:start + chunk]); the same tiles every call."""
    queries = queries.double()
    for start in range(0, keys.shape[0], chunk):
        yield start, (queries @ keys[start:start + chunk].double().T).float()


@dataclass(frozen=True)
class Calibration:
    """How a model states its confidence, read off the scores s (`objectives.Objective`).

    - softmax (InfoNCE): a query's candidates compete, p = softmax(scale x s) over all of
      them; confidence is the top-1 probability, NLL -log of the mass on the correct ones.
    - sigmoid (SigLIP): each (query, candidate) pair on its own, p = sigmoid(scale x s +
      bias), the probability that the pair matches; confidence is that of the top-1
      candidate, NLL the binary NLL summed over all candidates (the objective's own loss
      on the eval set, per query).
    """

    kind: Literal["softmax", "sigmoid"]
    scale: float
    bias: float = 0.0


def _ranks(queries: Tensor, keys: Tensor, query_owner: Tensor, key_owner: Tensor, chunk: int,
           calibration: Calibration | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per query q: 1 + #{keys not owned by q scoring >= q's best key among those it owns};
    with `calibration`, also (from the same tiles, in the same pass) q's confidence and NLL
    as `Calibration` defines them (None, None without).

    `query_owner[q]` is the id that marks q's correct keys; `key_owner[k]` the id of key k.
    """
    best = torch.full((queries.shape[0],), float("-inf"), device=queries.device)
    lse = torch.full((queries.shape[0],), float("-inf"), dtype=torch.float64, device=queries.device)
    correct_lse, top, binary_nll = lse.clone(), lse.clone(), torch.zeros_like(lse)
    for start, scores in _score_tiles(queries, keys, chunk):
        correct = query_owner[:, None] == key_owner[None, start:start + chunk]
        best = torch.maximum(best, scores.masked_fill(~correct, float("-inf")).amax(dim=1))
        if calibration is None:
            continue
        logits = calibration.scale * scores.double() + calibration.bias
        top = torch.maximum(top, logits.amax(dim=1))
        if calibration.kind == "softmax":  # streamed log-sum-exps of the whole row and of the query's own keys
            lse = torch.logaddexp(lse, logits.logsumexp(dim=1))
            correct_lse = torch.logaddexp(correct_lse, logits.masked_fill(~correct, float("-inf")).logsumexp(dim=1))
        else:  # -log sigmoid(+-z) = softplus(z) - [correct] z
            binary_nll += (F.softplus(logits) - correct * logits).sum(dim=1)
    better = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    for start, scores in _score_tiles(queries, keys, chunk):
        wrong = query_owner[:, None] != key_owner[None, start:start + chunk]
        better += ((scores >= best[:, None]) & wrong).sum(dim=1)
    if calibration is None:
        return 1 + better, None, None
    if calibration.kind == "softmax":
        return 1 + better, (top - lse).exp(), lse - correct_lse
    return 1 + better, torch.sigmoid(top), binary_nll


def _direction(queries: Tensor, keys: Tensor, query_owner: Tensor, key_owner: Tensor, chunk: int,
               calibration: Calibration | None) -> list[Tensor | None]:
    """`_ranks` over chunks of queries, concatenated: [ranks, confidence, nll]."""
    parts = [_ranks(queries[s:s + chunk], keys, query_owner[s:s + chunk], key_owner, chunk, calibration)
             for s in range(0, queries.shape[0], chunk)]
    return [None if column[0] is None else torch.cat(column) for column in zip(*parts, strict=True)]


ECE_BINS = 15
CALIBRATION_KEYS = [f"{d}_{m}" for d in DIRECTIONS for m in ("ece", "nll", "confidence")]
# The numbers a run is judged by, in one place: the console line and the model card show the
# `headline` keys, the ablations compare settings on PAIRED_KEYS.
ZERO_SHOT_KEYS = ("top1", "top5")
PAIRED_KEYS = [recall_key(d, k) for k in (1, 5) for d in DIRECTIONS] + [f"{d}_{m}" for m in ("ece", "nll")
                                                                          for d in DIRECTIONS]


def headline(key: str, calibration: bool = True) -> bool:
    """Whether a logged evaluation key (eval/i2t_R@1, eval/SET/t2i_R@5, eval/zeroshot/SET/top1,
    eval/i2t_ece, ...) is a headline number: recall, zero-shot accuracy, and (calibration)
    ECE and NLL."""
    name = key.rsplit("/", 1)[-1]
    return (name in RECALL_KEYS or ("zeroshot/" in key and name in ZERO_SHOT_KEYS)
            or (calibration and name in PAIRED_KEYS and name not in RECALL_KEYS))


@dataclass(frozen=True)
class ReliabilityBins:
    """Queries binned by confidence into equal-width bins (a confidence of exactly 1 falls in
    the last): per bin the count, the summed confidence and the hits. What a reliability
    diagram draws and the ECE is computed from."""

    counts: list[int]
    confidence_sums: list[float]
    hits: list[int]

    @classmethod
    def of(cls, confidence: Tensor, correct: Tensor, bins: int = ECE_BINS) -> ReliabilityBins:
        confidence = confidence.double().cpu()
        index = (confidence * bins).long().clamp(max=bins - 1)
        zeros = torch.zeros(bins, dtype=torch.float64)
        return cls(zeros.clone().index_add_(0, index, torch.ones_like(confidence)).long().tolist(),
                   zeros.clone().index_add_(0, index, confidence).tolist(),
                   zeros.clone().index_add_(0, index, correct.double().cpu()).long().tolist())

    def ece(self) -> float:
        """sum over bins of (bin share) x |accuracy - mean confidence| (Guo et al. 2017), in [0, 1]:
        sum_b (n_b / n) |hits_b / n_b - conf_b / n_b| = sum_b |hits_b - conf_b| / n."""
        return sum(abs(h - c) for h, c in zip(self.hits, self.confidence_sums, strict=True)) / max(sum(self.counts), 1)

    def merged(self, other: ReliabilityBins) -> ReliabilityBins:
        """The bins of both query sets together (several seeds of one setting)."""
        return ReliabilityBins([a + b for a, b in zip(self.counts, other.counts, strict=True)],
                               [a + b for a, b in zip(self.confidence_sums, other.confidence_sums, strict=True)],
                               [a + b for a, b in zip(self.hits, other.hits, strict=True)])


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = ECE_BINS) -> float:
    """`ReliabilityBins.ece` of these queries, in [0, 1]."""
    return ReliabilityBins.of(confidence, correct, bins).ece()


def _summary(ranks: Tensor, prefix: str) -> dict[str, float]:
    out = {recall_key(prefix, k): (ranks <= k).double().mean().item() * 100 for k in RECALL_KS}
    out[f"{prefix}_mean_rank"] = ranks.double().mean().item()
    out[f"{prefix}_median_rank"] = ranks.double().median().item()
    return out


@torch.no_grad()
def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, caption_to_image: Tensor,
                      chunk_size: int = 4096, calibration: Calibration | None = None,
                      reliability: dict[str, ReliabilityBins] | None = None) -> dict[str, float]:
    """R@1/5/10 (in percent), mean and median rank (1-based), both directions; with
    `calibration` (the model's objective and learned scale and bias), calibration too.

    Args:
        image_emb: (I, d) image embeddings; text_emb: (T, d) caption embeddings (compared by
            dot product: normalize first for cosine).
        caption_to_image: (T,) long, index of each caption's image; every image needs at
            least one caption.
    Keys: i2t_R@1, i2t_R@5, i2t_R@10, i2t_mean_rank, i2t_median_rank, and t2i_* likewise.

    Calibration treats each direction as a prediction over the whole eval set, with the
    probabilities `Calibration` defines (softmax over candidates, or sigmoid per pair):
    - {dir}_confidence: mean confidence in the top-1 candidate, in percent;
    - {dir}_ece: expected calibration error (ECE_BINS bins), in percent, where a query is
      correct when its rank is 1 (its R@1 hit, ties against the model);
    - {dir}_nll: mean NLL per query (softmax: -log of the probability of the correct
      candidates, for i2t the summed probability of the image's captions; sigmoid: the
      binary NLL summed over all candidates, every caption of the image a positive).
    With calibration, a dict passed as `reliability` gets each direction's `ReliabilityBins`
    (the reliability diagram's data; the ECE above is theirs).
    """
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    caption_to_image = caption_to_image.to(device=image_emb.device, dtype=torch.long)
    if text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(f"embedding dims differ: images {image_emb.shape[1]}, texts {text_emb.shape[1]}")
    if caption_to_image.shape != (n_texts,):
        raise ValueError(f"caption_to_image must have one entry per caption ({n_texts}), "
                         f"got shape {tuple(caption_to_image.shape)}")
    if n_texts and (caption_to_image.min() < 0 or caption_to_image.max() >= n_images):
        raise ValueError("caption_to_image holds an image index outside [0, n_images)")
    captions_per_image = torch.bincount(caption_to_image, minlength=n_images)
    if (captions_per_image == 0).any():
        raise ValueError(f"{int((captions_per_image == 0).sum())} images have no caption")
    image_ids = torch.arange(n_images, device=image_emb.device)
    out, confidence_keys = {}, {}
    for prefix, queries, keys, query_owner, key_owner in (("i2t", image_emb, text_emb, image_ids, caption_to_image),
                                                          ("t2i", text_emb, image_emb, caption_to_image, image_ids)):
        ranks, confidence, nll = _direction(queries, keys, query_owner, key_owner, chunk_size, calibration)
        out.update(_summary(ranks, prefix))
        if calibration is not None:
            confidence_keys[f"{prefix}_confidence"] = confidence.mean().item() * 100
            bins = ReliabilityBins.of(confidence, ranks == 1)
            confidence_keys[f"{prefix}_ece"] = bins.ece() * 100
            if reliability is not None:
                reliability[prefix] = bins
            confidence_keys[f"{prefix}_nll"] = nll.mean().item()
    return {**out, **confidence_keys}
