"""Retrieval evaluation of a model on eval sets, safe under ZeRO-3: every rank runs every
forward (the work is split with `encode_sharded`), every rank gets the metrics. An image is
encoded once per model state: the encoder keeps its embeddings by the image's content, so an
image set used by retrieval and by several zero-shot tasks (the demo's held-out emoji, by
group and by subgroup) is encoded once; the trainer's evaluator forgets them at each
evaluation (the model changed)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from alignvl_scale.config import EvalConfig
from alignvl_scale.data.evalsets import RetrievalSet, load_retrieval_set
from alignvl_scale.data.samples import open_image
from alignvl_scale.evaluation.metrics import Calibration, ReliabilityBins, retrieval_metrics
from alignvl_scale.evaluation.reliability import write_reliability
from alignvl_scale.evaluation.zeroshot import ZeroShotSet, class_embeddings, load_zero_shot_set, zero_shot_accuracy
from alignvl_scale.model.head import AlignVLModel, Preprocessing
from alignvl_scale.model.towers import set_train_mode
from alignvl_scale.runtime.distributed import rank_world
from alignvl_scale.runtime.log import progress


class Encoder:
    """Images and captions -> joint embeddings through towers + head (no noise, no mixup).

    `preprocessing` (the towers' image transform and tokenizer) may be None for feature inputs.
    dtype bfloat16 runs the towers under autocast, as training does (the head is fp32).
    """

    def __init__(self, model: AlignVLModel, preprocessing: Preprocessing | None, device: torch.device,
                 dtype: torch.dtype, image_tower=None, text_tower=None) -> None:
        self.model, self.preprocessing = model, preprocessing
        self.device, self.dtype = device, dtype
        # Towers kept outside the trained model (cached-feature runs) encode raw inputs here.
        self.image_tower = image_tower or model.image_tower
        self.text_tower = text_tower or model.text_tower
        self.image_memo: dict[bytes, torch.Tensor] = {}  # content digest -> embedding, for this model state

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """Image file paths, PIL images, raw image bytes, or tower feature vectors; one of
        them alone counts as a list of one."""
        if not isinstance(images, list | tuple):
            images = [images]
        if isinstance(images[0], np.ndarray | torch.Tensor):
            x = torch.stack([torch.as_tensor(i) for i in images])
        else:
            pil = [_as_pil(i).convert("RGB") for i in images]
            pixels = torch.stack([self.preprocessing.image_transform(p) for p in pil])
            with self.autocast():
                x = self.image_tower(pixel_values=pixels.to(self.device))
        return self.model.head.encode_image(x.to(self.device))

    @torch.no_grad()
    def encode_texts(self, texts) -> torch.Tensor:
        """Caption strings, or tower feature vectors; one caption alone is a list of one
        (not one caption per character)."""
        if isinstance(texts, str) or not isinstance(texts, list | tuple):
            texts = [texts]
        if isinstance(texts[0], np.ndarray | torch.Tensor):
            y = torch.stack([torch.as_tensor(t) for t in texts])
        else:
            tokens = {k: v.to(self.device) for k, v in self.preprocessing.tokenize(list(texts)).items()}
            with self.autocast():
                y = self.text_tower(**tokens)
        return self.model.head.encode_text(y.to(self.device))

    @torch.no_grad()
    def calibration(self) -> Calibration:
        """How the model states confidence: its objective's kind, with the learned scale
        and bias (module calls, so ZeRO-3 gathers them on every rank)."""
        head = self.model.head
        bias = 0.0 if head.logit_bias is None else float(head.logit_bias())
        return Calibration(head.objective.calibration, float(head.temperature()), bias)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def _as_pil(image) -> Image.Image:
    if isinstance(image, bytes):
        return open_image(image)
    if isinstance(image, str | Path):
        return open_image(Path(image).read_bytes())  # only JPEG, PNG and WebP are decoded
    return image


def _digest(image) -> bytes | None:
    """What an image is known by in the encoder's memo: its bytes' (or feature vector's) hash;
    None for what cannot be hashed cheaply (paths, PIL images): always encoded."""
    if isinstance(image, bytes):
        return hashlib.sha1(image).digest()
    if isinstance(image, np.ndarray):
        return hashlib.sha1(f"{image.dtype}{image.shape}".encode() + image.tobytes()).digest()
    return None


def _encode_images(encoder: Encoder, images: list, batch_size: int, desc: str) -> torch.Tensor:
    """Embeddings (on CPU) of `images`: those the encoder's memo holds from it, the others (each
    distinct one once) encoded over the ranks and remembered."""
    digests = [_digest(image) for image in images]
    fresh, where = [], {}  # images to encode; digest -> its row among them
    for i, digest in enumerate(digests):
        if digest is None or (digest not in encoder.image_memo and digest not in where):
            if digest is not None:
                where[digest] = len(fresh)
            fresh.append(i)
    rows = encode_sharded(len(fresh), lambda idx: encoder.encode_images([images[fresh[j]] for j in idx]), batch_size,
                          desc=f"{desc}: {len(fresh)} images" if fresh else None).cpu()
    encoder.image_memo.update({digest: rows[row] for digest, row in where.items()})
    uncached = iter(rows[[j for j, i in enumerate(fresh) if digests[i] is None]])
    return torch.stack([encoder.image_memo[d] if d is not None else next(uncached) for d in digests]) if images \
        else rows


def _encode_all(encoder: Encoder, images: list, texts: list, batch_size: int, desc: str = "encode"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (on CPU) of every image and every text, in eval mode, the work split over
    ranks (`encode_sharded`), with a progress bar; images the encoder has seen are not encoded again."""
    was_training = encoder.model.training
    set_train_mode(encoder.model, False)
    try:
        image_emb = _encode_images(encoder, images, batch_size, desc)
        text_emb = encode_sharded(len(texts), lambda idx: encoder.encode_texts([texts[i] for i in idx]), batch_size,
                                  desc=f"{desc}: {len(texts)} texts")
    finally:
        set_train_mode(encoder.model, was_training)
    return image_emb, text_emb.cpu()


def evaluate_set(encoder: Encoder, evalset: RetrievalSet, batch_size: int,
                 reliability: dict[str, ReliabilityBins] | None = None) -> dict[str, float]:
    """Retrieval and calibration metrics; a dict passed as `reliability` gets each direction's bins."""
    images, texts = _encode_all(encoder, evalset.images, evalset.texts, batch_size, "retrieval")
    return retrieval_metrics(images, texts, torch.tensor(evalset.caption_to_image), calibration=encoder.calibration(),
                             reliability=reliability)


def evaluate_zero_shot(encoder: Encoder, zs: ZeroShotSet, batch_size: int) -> dict[str, float]:
    """top1/top5 accuracy of the zero-shot set (see zeroshot.py); every rank runs every forward."""
    prompts = [template.format(name) for name in zs.classes for template in zs.templates]  # class-major
    images, texts = _encode_all(encoder, zs.images, prompts, batch_size, "zero-shot")
    return zero_shot_accuracy(images, class_embeddings(texts, len(zs.classes)), torch.tensor(zs.labels))


def evaluate_specs(encoder: Encoder, specs: list[str], batch_size: int,
                   cache: dict[str, RetrievalSet] | None = None, allow_outside: bool = False,
                   diagrams: tuple[Path, str] | None = None) -> dict[str, dict[str, float]]:
    """Metrics per eval spec; `cache` keeps loaded sets between evaluations of one run;
    `diagrams` = (folder, title): a reliability diagram per spec written there, named by
    the spec's stem (evaluation/reliability.py)."""
    cache = {} if cache is None else cache
    results = {}
    for spec in specs:
        if spec not in cache:
            cache[spec] = load_retrieval_set(spec, allow_outside=allow_outside)
        bins: dict[str, ReliabilityBins] = {}
        results[spec] = evaluate_set(encoder, cache[spec], batch_size, bins)
        if diagrams is not None and bins:
            write_reliability(diagrams[0], Path(spec).stem, bins, f"{diagrams[1]}: {Path(spec).name}")
    return results


class Evaluator:
    """A run's evaluation: retrieval on eval.data and zero-shot accuracy on eval.zero_shot,
    each set read once and kept for the run's later evaluations. Every rank calls it (ZeRO-3
    forwards); every rank gets the scalars, named as they are logged (eval/..., eval/<set>/...
    with several retrieval sets, eval/zeroshot/<folder>/...)."""

    def __init__(self, encoder: Encoder, cfg: EvalConfig) -> None:
        self.encoder, self.cfg = encoder, cfg
        self.retrieval_sets: dict[str, RetrievalSet] = {}
        self.zero_shot_sets: dict[str, ZeroShotSet] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.data or self.cfg.zero_shot)

    def __call__(self, diagrams: tuple[Path, str] | None = None) -> dict[str, float]:
        """diagrams: (folder, title) for a reliability diagram per retrieval set."""
        self.encoder.image_memo.clear()  # the model trained since the last evaluation
        results = evaluate_specs(self.encoder, self.cfg.data, self.cfg.batch_size, self.retrieval_sets,
                                 self.cfg.allow_outside_paths, diagrams)
        flat = {}
        for spec, metrics in results.items():
            name = f"{Path(spec).stem}/" if len(results) > 1 else ""
            flat.update({f"eval/{name}{k}": v for k, v in metrics.items()})
        for folder in self.cfg.zero_shot:
            if folder not in self.zero_shot_sets:
                self.zero_shot_sets[folder] = load_zero_shot_set(folder)
            accuracy = evaluate_zero_shot(self.encoder, self.zero_shot_sets[folder], self.cfg.batch_size)
            flat.update({f"eval/zeroshot/{Path(folder).name}/{k}": v for k, v in accuracy.items()})
        return flat

    def images(self) -> int:
        """Images in the retrieval sets read so far."""
        return sum(len(s.images) for s in self.retrieval_sets.values())


def encode_sharded(n_items: int, encode: Callable[[list[int]], torch.Tensor], batch_size: int,
                   desc: str | None = None) -> torch.Tensor:
    """Encode items 0..n-1 with the work split over ranks, every rank gets all rows in order.

    Rank r encodes items r, r + world, ...; every rank runs the same number of batches of
    the same size (the last padded with a repeat), so ZeRO-3's gathered forwards and the
    all_gather never wait on a rank that stopped early. desc: a progress bar (rank 0's,
    counting every rank's items), gone when done.
    """
    rank, world = rank_world()
    if n_items == 0:
        return torch.empty(0)
    per_rank = -(-n_items // world)
    mine = [min(i, n_items - 1) for i in range(rank, per_rank * world, world)]
    parts = []
    with progress(n_items, desc or "", "item", leave=False, enabled=desc is not None) as bar:
        for start in range(0, per_rank, batch_size):
            chunk = mine[start:start + batch_size]
            chunk += [chunk[-1]] * (min(batch_size, per_rank) - len(chunk))
            parts.append(encode(chunk)[:len(mine[start:start + batch_size])])
            bar.update(min(len(mine[start:start + batch_size]) * world, n_items - bar.n))
    local = torch.cat(parts).contiguous()
    if world == 1:
        return local[:n_items]
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    # Row k of rank r is item r + k * world: interleave back.
    return torch.stack(gathered, dim=1).reshape(per_rank * world, -1)[:n_items]
