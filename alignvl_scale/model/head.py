"""The parts of Align-VL that sit on top of the towers: FuseMix latent mixup, Random
Perturbation, the V-L adapters and the learnable temperature (docs/design.md, steps 2-5).

Every random draw of the model (mixup's partners and lambda, the noise, the adapters' and
trainable towers' dropout masks) is keyed by the sample, not the rank (model/keyed.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignvl_scale.config import MAX_LOGIT_SCALE, Mixup, NoiseMode, RunConfig, choices, tower_config
from alignvl_scale.data.shards import DataSourceError, manifest_of
from alignvl_scale.data.streams import RowKeys
from alignvl_scale.losses.registry import OBJECTIVES, HeadOutput, ObjectiveSpec
from alignvl_scale.model.keyed import _Seeded, drawing_for, keyed_dropout, tower_draws
from alignvl_scale.model.portable import LearnedBias, Temperature, build_adapter
from alignvl_scale.model.towers import build_preprocessing as tower_preprocessing
from alignvl_scale.model.towers import build_tower
from alignvl_scale.runtime.compat import beta_pair_weight
from alignvl_scale.runtime.perf import exact_fp32_matmuls
from alignvl_scale.runtime.seeding import stream_seed


class RandomPerturbation(_Seeded):
    """x + sigma * eps (absolute) or x + sigma * rms(x) * eps (relative), training only."""

    MODES = choices(NoiseMode)

    def __init__(self, sigma: float, mode: str = "absolute", seed: int = 0, run_seed: int = 0, name: str = "noise"
                 ) -> None:
        super().__init__(seed, run_seed, name)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if mode not in self.MODES:
            raise ValueError(f"noise mode must be one of {self.MODES}, got {mode!r}")
        self.sigma = sigma
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        """fp32 out whatever comes in: noise at sigma = 0.01 on bf16 features of magnitude ~4
        is below bf16's resolution (2**-6 there), so casting back would drop most of it."""
        x = x.float()
        if not self.training or self.sigma == 0:
            return x
        draws = [torch.randn((n, *x.shape[1:]), device=x.device, dtype=torch.float32, generator=g)
                 for g, n in self.draws(x.shape[0], x.device)]
        eps = draws[0] if len(draws) == 1 else torch.cat(draws)
        level = self.sigma
        if self.mode == "relative":
            level = self.sigma * x.pow(2).mean(dim=-1, keepdim=True).sqrt()
        return x + level * eps


class LatentMixup(_Seeded):
    """Latent mixup of paired features within each data stream's share of the batch (the
    whole batch without RowKeys): one lam ~ Beta(a, a) per share, the same lam and the same
    partner rows for both modalities, so that mixed pairs stay pairs. Training only.

    - `fusemix` (FuseMix's): rows i and i + b/2 of a share of b rows are mixed, b rows -> b/2
      mixed pairs. Every input row is in exactly one mixed pair, so no two rows of the
      contrastive batch share an input.
    - `permutation`: row i is mixed with row perm(i) of a random permutation of its share;
      b rows stay b, and each input appears in two mixed rows (a "negative" can share half a
      positive).
    - `off`: identity.
    """

    MODES = choices(Mixup)

    def __init__(self, mode: str = "off", alpha: float = 1.0, seed: int = 0, run_seed: int = 0) -> None:
        super().__init__(seed, run_seed, "mixup")
        if mode not in self.MODES:
            raise ValueError(f"mixup mode must be one of {self.MODES}, got {mode!r}")
        if alpha <= 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        self.mode, self.alpha = mode, alpha

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training or self.mode == "off":
            return x, y
        mixed, start = [], 0
        for gen, n in self.draws(x.shape[0], x.device):
            mixed.append(self._mix(x[start:start + n], y[start:start + n], gen))
            start += n
        return torch.cat([m[0] for m in mixed]), torch.cat([m[1] for m in mixed])

    def _mix(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        lam = beta_pair_weight(self.alpha, gen, x.device)
        if self.mode == "fusemix":
            if x.shape[0] % 2:
                raise ValueError(f"fusemix mixup needs an even share, got {x.shape[0]} rows")
            (x1, x2), (y1, y2) = x.chunk(2), y.chunk(2)
            return lam * x1 + (1 - lam) * x2, lam * y1 + (1 - lam) * y2
        perm = torch.randperm(x.shape[0], device=x.device, generator=gen)
        return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


@contextmanager
def _fp32(device: torch.device):
    """Autocast off and no TF32: the head's numbers at fp32 resolution whatever the towers run in."""
    with torch.autocast(device_type=device.type, enabled=False), exact_fp32_matmuls(device):
        yield


class AlignVLHead(nn.Module):
    """Tower outputs (x, y) -> a HeadOutput: normalized joint embeddings (u, v), the logit
    scale, and the bias of objectives that have one (`losses.registry`).

    mixup -> Random Perturbation (independent noise per modality) -> adapters -> L2 norm,
    all in fp32 with autocast off (the head is small next to the towers; in bf16 the noise
    at sigma = 0.01 would fall below the resolution of features of magnitude ~4).
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, adapter: str = "mlp",
                 adapter_depth: int = 2, dropout: float = 0.1, noise_sigma: float = 0.0,
                 noise_mode: str = "absolute", mixup: str = "off", mixup_alpha: float = 1.0, seed: int = 0,
                 rank: int = 0, objective: ObjectiveSpec = OBJECTIVES["infonce"], logit_scale_init: float | None = None,
                 logit_bias_init: float | None = None) -> None:
        """objective: what the head's output is trained with (its initial scale and bias, and
        whether it has one)."""
        super().__init__()
        self.run_seed = seed
        # Keyed by the rows drawn for (RowKeys); without keys, three streams per rank of (seed, rank) alone.
        self.mixup = LatentMixup(mixup, mixup_alpha, seed=stream_seed(seed, "mixup", rank), run_seed=seed)
        self.image_noise = RandomPerturbation(noise_sigma, noise_mode, stream_seed(seed, "image_noise", rank), seed,
                                              "image_noise")
        self.text_noise = RandomPerturbation(noise_sigma, noise_mode, stream_seed(seed, "text_noise", rank), seed,
                                             "text_noise")
        self.image_adapter = keyed_dropout(build_adapter(adapter, image_dim, embed_dim, adapter_depth, dropout=dropout),
                                           seed, "image_adapter")
        self.text_adapter = keyed_dropout(build_adapter(adapter, text_dim, embed_dim, adapter_depth, dropout=dropout),
                                          seed, "text_adapter")
        self.objective = objective
        self.temperature = Temperature(objective.logit_scale_init if logit_scale_init is None else logit_scale_init,
                                       MAX_LOGIT_SCALE)
        bias = objective.logit_bias_init if logit_bias_init is None else logit_bias_init
        self.logit_bias = LearnedBias(bias) if objective.logit_bias_init is not None else None

    def encode_image(self, x: Tensor) -> Tensor:
        with _fp32(x.device):
            return F.normalize(self.image_adapter(self.image_noise(x.float())), dim=-1)

    def encode_text(self, y: Tensor) -> Tensor:
        with _fp32(y.device):
            return F.normalize(self.text_adapter(self.text_noise(y.float())), dim=-1)

    def forward(self, x: Tensor, y: Tensor, rows: RowKeys | None = None) -> HeadOutput:
        """rows: which data streams' shares the batch holds (training: the draws are keyed by them)."""
        with _fp32(x.device), drawing_for(rows):
            x, y = self.mixup(x.float(), y.float())
            return HeadOutput(self.encode_image(x), self.encode_text(y), self.temperature(),
                              None if self.logit_bias is None else self.logit_bias())

    def random_modules(self) -> dict[str, _Seeded]:
        return {"mixup": self.mixup, "image_noise": self.image_noise, "text_noise": self.text_noise}


class AlignVLModel(nn.Module):
    """Towers (absent when training on cached features) + the Align-VL head.

    forward(batch) -> HeadOutput. Batches hold either `pixel_values`,
    `input_ids`, `attention_mask` (end to end) or `image_features`, `text_features`.
    """

    def __init__(self, head: AlignVLHead, image_tower: nn.Module | None = None,
                 text_tower: nn.Module | None = None) -> None:
        super().__init__()
        self.image_tower, self.text_tower, self.head = image_tower, text_tower, head

    def tower_features(self, batch: dict) -> tuple[Tensor, Tensor]:
        if "image_features" in batch:
            return batch["image_features"], batch["text_features"]
        return self.image_features(batch), self.text_features(batch)

    def image_features(self, batch: dict) -> Tensor:
        return self._tower(self.image_tower, "image_tower", batch.get("rows"), pixel_values=batch["pixel_values"])

    def text_features(self, batch: dict) -> Tensor:
        return self._tower(self.text_tower, "text_tower", batch.get("rows"), input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"])

    def _tower(self, tower: nn.Module, name: str, rows: RowKeys | None, **inputs: Tensor) -> Tensor:
        """A tower's output; a trainable one's training forward draws its dropout keyed by `rows`."""
        keyed = rows if tower.trainable and tower.training else None
        with (torch.set_grad_enabled(torch.is_grad_enabled() and tower.trainable),
              tower_draws(keyed, self.head.run_seed, f"dropout.{name}")):
            return tower(**inputs)

    def forward(self, batch: dict) -> HeadOutput:
        x, y = self.tower_features(batch)
        return self.head(x, y, batch.get("rows"))


def with_feature_manifest(cfg: RunConfig) -> RunConfig:
    """A cached-feature run's config completed from its feature manifest (what produced the
    features): tower dims, tower configs and image transform, so that the config saved with
    the run rebuilds the same towers for inference. A new config; the given one is left as
    it is. Image-text configs, and configs saved with a run (already complete), come back
    unchanged."""
    if cfg.data.kind != "features" or (cfg.model.image_dim is not None and cfg.model.text_dim is not None):
        return cfg
    specs = cfg.data.train or cfg.eval.data
    manifest = next(filter(None, map(manifest_of, specs)), None)
    if manifest is None:
        raise DataSourceError(f"data.kind=features needs a feature manifest in one of {specs}")
    towers = manifest.get("towers", {})
    model = dataclasses.replace(cfg.model, image_dim=manifest["image_dim"], text_dim=manifest["text_dim"],
                                **({"image_tower": tower_config(towers["image"], "manifest towers.image"),
                                    "text_tower": tower_config(towers["text"], "manifest towers.text")}
                                   if "image" in towers else {}))
    data = dataclasses.replace(cfg.data, **manifest.get("image_transform", {}))
    return dataclasses.replace(cfg, model=model, data=data)


def build_model(cfg: RunConfig, rank: int = 0, load_weights: bool = True) -> AlignVLModel:
    """The model a run config describes. With data.kind=features the towers stay out of the
    trained model; `build_towers` makes them for extraction and inference."""
    cfg = with_feature_manifest(cfg)
    m = cfg.model
    if cfg.data.kind == "features":
        towers, image_dim, text_dim = (None, None), m.image_dim, m.text_dim
    else:
        towers = build_towers(cfg, load_weights)
        image_dim, text_dim = towers[0].output_dim, towers[1].output_dim
    head = AlignVLHead(image_dim, text_dim, m.embed_dim, m.adapter, m.adapter_depth, m.dropout, m.noise_sigma,
                       m.noise_mode, m.mixup, m.mixup_beta, seed=cfg.seed, rank=rank,
                       objective=OBJECTIVES[cfg.loss.objective],
                       logit_scale_init=cfg.loss.logit_scale_init, logit_bias_init=cfg.loss.logit_bias_init)
    return AlignVLModel(head, *towers)


def build_towers(cfg: RunConfig, load_weights: bool = True) -> tuple[nn.Module, nn.Module]:
    return (build_tower(cfg.model.image_tower, "image", cfg.data, load_weights),
            build_tower(cfg.model.text_tower, "text", cfg.data, load_weights))


@dataclass(frozen=True)
class Preprocessing:
    """What turns raw inputs into tower inputs: plain CPU objects that DataLoader workers use."""

    image_transform: Callable  # PIL image -> (3, H, W) float tensor
    tokenize: Callable  # list of captions -> dict of token tensors


def build_preprocessing(cfg: RunConfig) -> Preprocessing:
    """The towers' image transform and tokenizer. Build it outside `zero.Init` (which puts
    every tensor it sees created on the accelerator; a worker then mixes devices)."""
    cfg = with_feature_manifest(cfg)
    return Preprocessing(tower_preprocessing(cfg.model.image_tower, "image", cfg.data),
                         tower_preprocessing(cfg.model.text_tower, "text", cfg.data))
