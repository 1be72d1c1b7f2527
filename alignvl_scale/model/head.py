"""The parts of Align-VL that sit on top of the towers: FuseMix latent mixup, Random
Perturbation, the V-L adapters and the learnable temperature (docs/design.md, steps 2-5).

Mixup and noise draw from their own `torch.Generator`, seeded from (run seed, rank)
(runtime/seeding.py), so every rank perturbs independently, a run is reproducible, and the
generator state can be checkpointed with `rng_state()` / `load_rng_state()`.
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
from alignvl_scale.losses.registry import OBJECTIVES, HeadOutput, ObjectiveSpec
from alignvl_scale.model.portable import LearnedBias, Temperature, build_adapter
from alignvl_scale.model.towers import build_preprocessing as tower_preprocessing
from alignvl_scale.model.towers import build_tower
from alignvl_scale.runtime.compat import beta_pair_weight
from alignvl_scale.runtime.perf import exact_fp32_matmuls
from alignvl_scale.runtime.seeding import stream_seed


class _Seeded(nn.Module):
    """A module that owns a generator, created lazily on the device of its first input."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def rng_state(self) -> Tensor | None:
        return self._generator.get_state() if self._generator is not None else self._pending_state

    def load_rng_state(self, state: Tensor | None) -> None:
        """None (a state taken before the first draw) restarts the stream from the seed."""
        if state is None:
            self._generator, self._pending_state = None, None
        elif self._generator is not None:
            self._generator.set_state(state)
        else:
            self._pending_state = state


class RandomPerturbation(_Seeded):
    """x + sigma * eps (absolute) or x + sigma * rms(x) * eps (relative), training only."""

    MODES = choices(NoiseMode)

    def __init__(self, sigma: float, mode: str = "absolute", seed: int = 0) -> None:
        super().__init__(seed)
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
        eps = torch.randn(x.shape, device=x.device, dtype=torch.float32, generator=self.generator(x.device))
        level = self.sigma
        if self.mode == "relative":
            level = self.sigma * x.pow(2).mean(dim=-1, keepdim=True).sqrt()
        return x + level * eps


class LatentMixup(_Seeded):
    """Latent mixup of paired features: one lam ~ Beta(a, a) per batch, the same lam and the
    same partner rows for both modalities, so that mixed pairs stay pairs. Training only.

    - `fusemix` (FuseMix's): rows i and i + B/2 are mixed, B rows -> B/2 mixed pairs. Every
      input row is in exactly one mixed pair, so no two rows of the contrastive batch share
      an input.
    - `permutation`: row i is mixed with row perm(i) of a random permutation; B rows stay B,
      and each input appears in two mixed rows (a "negative" can share half a positive).
    - `off`: identity.
    """

    MODES = choices(Mixup)

    def __init__(self, mode: str = "off", alpha: float = 1.0, seed: int = 0) -> None:
        super().__init__(seed)
        if mode not in self.MODES:
            raise ValueError(f"mixup mode must be one of {self.MODES}, got {mode!r}")
        if alpha <= 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        self.mode, self.alpha = mode, alpha

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training or self.mode == "off":
            return x, y
        gen = self.generator(x.device)
        lam = beta_pair_weight(self.alpha, gen, x.device)
        if self.mode == "fusemix":
            if x.shape[0] % 2:
                raise ValueError(f"fusemix mixup needs an even batch, got {x.shape[0]} rows")
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
        # Three independent streams per rank, each a function of (seed, rank) alone.
        self.mixup = LatentMixup(mixup, mixup_alpha, seed=stream_seed(seed, "mixup", rank))
        self.image_noise = RandomPerturbation(noise_sigma, noise_mode, seed=stream_seed(seed, "image_noise", rank))
        self.text_noise = RandomPerturbation(noise_sigma, noise_mode, seed=stream_seed(seed, "text_noise", rank))
        self.image_adapter = build_adapter(adapter, image_dim, embed_dim, adapter_depth, dropout=dropout)
        self.text_adapter = build_adapter(adapter, text_dim, embed_dim, adapter_depth, dropout=dropout)
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

    def forward(self, x: Tensor, y: Tensor) -> HeadOutput:
        with _fp32(x.device):
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
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_tower.trainable):
            return self.image_tower(pixel_values=batch["pixel_values"])

    def text_features(self, batch: dict) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_tower.trainable):
            return self.text_tower(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def forward(self, batch: dict) -> HeadOutput:
        x, y = self.tower_features(batch)
        return self.head(x, y)


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
