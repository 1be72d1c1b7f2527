"""One validated run config: YAML file + `section.key=value` overrides, checked before any
process group starts. Every default lives here, once, and every allowed value of a key that
takes a name (a `Literal` below, which the components read their choices from).

    cfg = load_config("configs/demo.yaml", ["loss.smoothing=0.2", "data.batch_size=64"])

Unknown keys and bad values raise ConfigError naming the key and what is allowed. This module
imports nothing of the project: what only a component can check (an objective's bias, the
DeepSpeed JSON, an installed tracker) is checked by that component (`training/preflight.py`
calls them all before any process group).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the source tree (editable installs)
PACKAGE_ROOT = Path(__file__).resolve().parent
DS_CONFIGS = PACKAGE_ROOT / "ds_configs"  # shipped in the wheel; ds_configs/ in the tree links here
CONFIGS = PACKAGE_ROOT / "configs"

# The names a key may take; components read their choices from these (typing.get_args).
Objective = Literal["infonce", "siglip"]
MatmulPrecision = Literal["fp32", "tf32", "bf16"]
NoiseMode = Literal["absolute", "relative"]
Mixup = Literal["off", "fusemix", "permutation"]
Adapter = Literal["mlp", "linear"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]

MAX_LOGIT_SCALE = 100.0  # the temperature multiplier's clamp (model/head.py Temperature)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """"1 rank", "2 ranks": a count in a message (every layer's messages use it)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def choices(kind: Any) -> tuple[str, ...]:
    """The allowed values of a Literal type above."""
    return typing.get_args(kind)


class UserError(Exception):
    """A mistake in what the user gave (config, data, run folder, checkpoint, launch): it ends
    the command with one line naming it and exit code 2, never a traceback. Every such error
    of the project derives from this one."""


class ConfigError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class DecodeLimits:
    """The bounds on what one sample may cost; the defaults of the `data.max_*` keys."""

    max_image_bytes: int = 50 * 2**20
    max_image_pixels: int = 64 * 2**20
    max_caption_chars: int = 4096
    max_member_bytes: int = 64 * 2**20  # any tar member, checked on its header before it is read


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {allowed}, got {value!r}")


@dataclass
class LoraSettings:
    rank: int = 8
    """Rank r of each low-rank update (B @ A, A: r x in, B: out x r)."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the input of each low-rank update."""
    target_modules: list[str] | None = None
    """Names (suffixes) of the Linear layers that get an update, e.g. [q_proj, v_proj]; null: PEFT's default for
    the architecture (the attention's query and value projections)."""

    def validate(self, key: str) -> None:
        _require(self.rank >= 1, f"{key}.rank", ">= 1", self.rank)
        _require(self.alpha > 0, f"{key}.alpha", "> 0", self.alpha)
        _require(0 <= self.dropout < 1, f"{key}.dropout", "in [0, 1)", self.dropout)
        _require(self.target_modules is None or len(self.target_modules) > 0, f"{key}.target_modules",
                 "null or a non-empty list of module names", self.target_modules)


@dataclass
class TowerConfig:
    kind: str = "hf"
    """Tower family: a name registered in alignvl_scale.model.towers (hf, efficientnet_lite0, minilm, ...)."""
    name: str = ""
    """HF hub name or local folder of the weights (hf); ignored by kinds that need none."""
    pooling: Literal["auto", "cls", "mean", "last_token", "pooler"] = "auto"
    """How one vector comes out of the tower's tokens; auto picks by architecture. mean and last_token read the
    attention mask, so either padding side works."""
    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained: the weights at `name`; random: its architecture, freshly initialized."""
    trainable: bool = False
    """Train the tower too (the paper freezes both and trains adapters only); how: `finetune`."""
    finetune: Literal["full", "lora", "last_n"] = "full"
    """How a trainable tower trains. full: every weight; lora: low-rank updates (PEFT LoRA, `lora`) on frozen base
    weights, merged into them at export; last_n: the last `last_n` blocks and the final norm, the rest frozen."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """finetune: lora: the low-rank updates."""
    last_n: int = 1
    """finetune: last_n: how many of the tower's last blocks (transformer layers) train."""
    lr: float | None = None
    """Peak learning rate of this tower's parameters (same schedule as the head's); null: train.lr."""
    gradient_checkpointing: bool = False
    """Recompute the tower's activations in backward (trainable towers; non-reentrant): less memory, ~1/3 more
    compute."""
    max_length: int = 77
    """Text towers: tokens per caption (padded and truncated to it)."""
    padding_side: Literal["right", "left"] = "right"
    """Text towers: where the tokenizer pads (decoder LLMs are often trained with left padding)."""
    prefix: str = ""
    """Text towers: prepended to every caption, in training, evaluation and export (an instruction, as E5's
    'query: ' or LLM2CLIP's)."""

    def validate(self, key: str) -> None:
        _require(self.max_length >= 1, f"{key}.max_length", ">= 1", self.max_length)
        _require(self.init == "pretrained" or self.trainable, f"{key}.init", "pretrained unless the tower is "
                 "trainable (a frozen random tower teaches the adapters nothing)", self.init)
        _require(self.finetune == "full" or self.trainable, f"{key}.finetune", f"full unless {key}.trainable is "
                 "true (a frozen tower trains nothing)", self.finetune)
        _require(self.finetune == "full" or self.init == "pretrained", f"{key}.finetune", f"full when {key}.init is "
                 "random (the frozen base weights would be random, and ZeRO 1-2 checkpoints do not hold them)",
                 self.finetune)
        _require(self.last_n >= 1, f"{key}.last_n", ">= 1", self.last_n)
        _require(self.lr is None or self.lr > 0, f"{key}.lr", "null or > 0", self.lr)
        self.lora.validate(f"{key}.lora")


@dataclass
class ModelConfig:
    image_tower: TowerConfig = field(default_factory=TowerConfig)
    """The image encoder."""
    text_tower: TowerConfig = field(default_factory=TowerConfig)
    """The text encoder."""
    embed_dim: int = 512
    """Dimension of the joint embedding space."""
    adapter: Adapter = "mlp"
    """mlp: FuseMix's residual MLP blocks then a projection; linear: one projection."""
    adapter_depth: int = 2
    """Residual blocks of the mlp adapter."""
    dropout: float = 0.1
    """Dropout inside the mlp adapter's blocks."""
    noise_sigma: float = 0.01
    """Random Perturbation level sigma (the paper's default 0.01); 0 turns it off."""
    noise_mode: NoiseMode = "absolute"
    """absolute: N(0, sigma^2) noise; relative: sigma times each feature vector's RMS."""
    mixup: Mixup = "off"
    """Latent mixup within each data stream's share of the batch, one lambda ~ Beta(a, a) per share shared by both
    modalities. fusemix (FuseMix's, the paper's recipe): each share's first half mixed with its second half, b rows
    -> b / 2; permutation: each row mixed with a row of a random permutation of its share, b rows stay b."""
    mixup_alpha: float | None = None
    """The Beta(a, a) parameter of model.mixup; null: 1.0, FuseMix's (lambda uniform in [0, 1])."""
    image_dim: int | None = None
    """Cached-feature runs: the image tower's output size; null reads it from the feature manifest."""
    text_dim: int | None = None
    """Cached-feature runs: the text tower's output size; null reads it from the feature manifest."""

    def validate(self, key: str) -> None:
        self.image_tower.validate(f"{key}.image_tower")
        self.text_tower.validate(f"{key}.text_tower")
        _require(self.embed_dim >= 1, f"{key}.embed_dim", ">= 1", self.embed_dim)
        _require(self.adapter_depth >= 0, f"{key}.adapter_depth", ">= 0", self.adapter_depth)
        _require(0 <= self.dropout < 1, f"{key}.dropout", "in [0, 1)", self.dropout)
        _require(self.noise_sigma >= 0, f"{key}.noise_sigma", ">= 0", self.noise_sigma)
        _require(self.mixup_alpha is None or self.mixup_alpha > 0, f"{key}.mixup_alpha", "null or > 0",
                 self.mixup_alpha)
        _require(self.mixup_alpha is None or self.mixup != "off", f"{key}.mixup_alpha",
                 "null while model.mixup is off (set model.mixup: fusemix or permutation)", self.mixup_alpha)

    @property
    def mixup_beta(self) -> float:
        return 1.0 if self.mixup_alpha is None else self.mixup_alpha


@dataclass
class LossConfig:
    objective: Objective = "infonce"
    """infonce: symmetric InfoNCE (softmax over the global batch); siglip: the sigmoid loss with a learned bias
    (alignvl_scale/losses/registry.py)."""
    smoothing: float = 0.0
    """Embedding Smoothing alpha in [0, 1): targets (1 - alpha) on the pair + alpha / N everywhere (for siglip,
    each pair's binary target)."""
    logit_scale_init: float | None = None
    """The temperature multiplier exp(t) at step 0; null: the objective's (infonce 1/0.07, siglip 10)."""
    logit_bias_init: float | None = None
    """siglip: the bias at step 0; null: the objective's (-10). Objectives without a bias refuse it."""
    chunk_size: int | None = None
    """null: the plain B x N logits per direction; an int: the fused path, tiles of at most this many rows and
    columns (memory O(chunk^2 + N x d))."""
    matmul_precision: MatmulPrecision = "fp32"
    """The fused path's tile matmuls: fp32, tf32 or bf16 (split bf16 with fp32 accumulation)."""

    def validate(self, key: str) -> None:
        _require(self.logit_scale_init is None or 0 < self.logit_scale_init <= MAX_LOGIT_SCALE,
                 f"{key}.logit_scale_init", f"null or in (0, {MAX_LOGIT_SCALE:g}] (the clamp)", self.logit_scale_init)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training shard specs: a folder with a manifest, a manifest.json, a brace list, or pipe:CMD."""
    train_weights: list[float] | None = None
    """Sampling weight per source (resampled mode only)."""
    kind: Literal["image-text", "features"] = "image-text"
    """image-text: images and captions through the towers; features: cached tower outputs."""
    mode: Literal["epoch", "resampled"] = "epoch"
    """epoch: every shard once per epoch; resampled: an endless weighted draw of shards."""
    batch_size: int = 32
    """Micro batch per rank; the contrastive batch is batch_size x train.accumulation x world."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks (the contrastive batch before mixup): data.batch_size becomes
    global / (world x train.accumulation), refused when that does not divide, so that a run resumed on another
    number of ranks keeps its negatives and its loss. Set this or data.batch_size, not both; null: data.batch_size."""
    workers: int = 2
    """DataLoader worker processes per rank (at most its data streams: each worker reads whole streams)."""
    streams: int | None = None
    """Data streams the run reads its shards through, fixed at launch and kept by its checkpoints: every global
    micro-batch takes the same share from each, in stream order, so a resume on any number of ranks that divides
    it continues with the very same batches. In epoch mode the streams split each epoch by samples, not shards:
    every sample once per epoch, the last global micro-batch padded with the epoch's first samples. null: the
    largest count up to max(64, ranks) that the ranks divide and that divides the global micro-batch."""
    shuffle_window: int = 256
    """Raw samples shuffled together within each shard."""
    samples_per_shard: int | None = None
    """Samples per shard for sources without a manifest."""
    max_skip_fraction: float = 0.05
    """Stop the run when more than this fraction of samples is skipped as bad."""
    skip_check_min_samples: int = 200
    """Samples read before max_skip_fraction is enforced."""
    image_size: int = 224
    """Side of the square image the towers see (built-in transforms)."""
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel mean of the built-in image normalization."""
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel std of the built-in image normalization."""
    augment_crop_scale: list[float] | None = None
    """Train-time random resized crop: [min, max] area fraction kept (open_clip's default [0.9, 1.0]); null: off."""
    caption_noise: float = 0.0
    """Noisy correspondences: this fraction of each training shard's samples get another training sample's
    caption (a permutation among them), the same samples and captions in every run and seed; 0: off."""
    caption_noise_seed: int = 0
    """Which samples data.caption_noise corrupts (independent of the run's seed)."""
    train_fraction: float = 1.0
    """Train on this fraction of the samples, the same subset in every run and seed (smaller fractions are
    subsets of larger ones); an epoch is then that many samples."""
    max_image_bytes: int = DecodeLimits.max_image_bytes
    """Largest encoded image read; larger ones are skipped (oversized_image)."""
    max_image_pixels: int = DecodeLimits.max_image_pixels
    """Largest decoded image (width x height); larger ones are skipped."""
    max_caption_chars: int = DecodeLimits.max_caption_chars
    """Longest caption kept, in characters; longer ones are skipped."""
    max_member_bytes: int = DecodeLimits.max_member_bytes
    """Largest tar member read at all; its declared size is checked before reading."""

    def validate(self, key: str) -> None:
        _require(self.global_batch_size is None or self.global_batch_size >= 1, f"{key}.global_batch_size",
                 "null or >= 1", self.global_batch_size)
        for name in ("batch_size", "shuffle_window", "image_size", "max_image_bytes", "max_image_pixels",
                     "max_caption_chars", "max_member_bytes"):
            _require(getattr(self, name) >= 1, f"{key}.{name}", ">= 1", getattr(self, name))
        _require(self.workers >= 0, f"{key}.workers", ">= 0", self.workers)
        _require(self.streams is None or self.streams >= 1, f"{key}.streams", "null or >= 1", self.streams)
        _require(0 <= self.max_skip_fraction <= 1, f"{key}.max_skip_fraction", "in [0, 1]",
                 self.max_skip_fraction)
        _require(self.samples_per_shard is None or self.samples_per_shard >= 1, f"{key}.samples_per_shard",
                 "null or >= 1", self.samples_per_shard)
        if self.train_weights is not None:
            _require(len(self.train_weights) == len(self.train) and all(w > 0 for w in self.train_weights),
                     f"{key}.train_weights", f"{len(self.train)} positive numbers (one per source)",
                     self.train_weights)
            _require(self.mode == "resampled" or len(set(self.train_weights)) == 1, f"{key}.train_weights",
                     "equal unless data.mode is resampled (epoch mode reads each shard once)",
                     self.train_weights)
        _require(0 <= self.caption_noise <= 1, f"{key}.caption_noise", "in [0, 1]", self.caption_noise)
        _require(0 < self.train_fraction <= 1, f"{key}.train_fraction", "in (0, 1]", self.train_fraction)
        crop = self.augment_crop_scale
        _require(crop is None or (len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1), f"{key}.augment_crop_scale",
                 "null or [min, max] with 0 < min <= max <= 1", crop)
        for name in ("image_mean", "image_std"):
            _require(len(getattr(self, name)) == 3, f"{key}.{name}", "3 numbers", getattr(self, name))

    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_image_bytes, self.max_image_pixels, self.max_caption_chars, self.max_member_bytes)


@dataclass
class TrainConfig:
    steps: int | None = None
    """The budget in optimizer steps (or train.epochs, not both)."""
    epochs: int | None = None
    """The budget in whole epochs (epoch mode only)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to 1-D parameters: biases, norms, the temperature)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.0
    """The cosine decays to lr x min_lr_ratio."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping (and ZeRO 1-2's norm pass) off."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: autocast for the towers over fp32 parameters; the Align-VL head stays fp32."""
    accumulation: int = 1
    """K micro-batches per step, forming one contrastive batch of batch_size x K x world (GradCache)."""
    tf32: bool = True
    """CUDA: fp32 matmuls on TF32 tensor cores (open_clip's default; fp32 towers run several times faster). The
    head's and the loss's forward stay full fp32; backward matmuls follow this switch (docs/training.md)."""
    cudnn_benchmark: bool = True
    """CUDA: cuDNN times its convolution algorithms once per input shape and keeps the fastest (conv towers,
    patch embeddings; the shapes here are fixed). Not bit-reproducible run to run."""
    max_bad_steps: int = 5
    """Skipped steps in a row (a non-finite loss, or a non-finite gradient norm DeepSpeed skipped) before the run
    stops."""
    log_every: int = 10
    """Steps between logged scalars."""
    peak_tflops: float | None = None
    """Per-device peak for perf/mfu; null: the dense bf16 peak looked up by device name."""
    profile_steps: int = 0
    """> 0: torch.profiler over this many steps (tables and traces in RUN_DIR/profile)."""
    profile_start: int = 10
    """Steps done before profiling starts (past the warm-up)."""
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    """Preemption and Ctrl-C: on one of these signals (at any rank) every rank finishes its step, saves a checkpoint
    and exits 0 (SLURM: --signal=USR1@120); the same signal a second time exits at once. []: signals keep their
    default action."""

    def validate(self, key: str, data: DataConfig) -> None:
        _require((self.steps is None) != (self.epochs is None), f"{key}.steps", "set, or train.epochs set (one of "
                 "the two)", {"steps": self.steps, "epochs": self.epochs})
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{key}.{name}", "null or >= 1", value)
        _require(self.epochs is None or data.mode == "epoch", f"{key}.epochs",
                 "null when data.mode is resampled (set train.steps)", self.epochs)
        _require(self.lr > 0, f"{key}.lr", "> 0", self.lr)
        _require(self.weight_decay >= 0, f"{key}.weight_decay", ">= 0", self.weight_decay)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
                 "two numbers in [0, 1)", self.betas)
        _require(self.warmup_steps >= 0, f"{key}.warmup_steps", ">= 0", self.warmup_steps)
        _require(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _require(self.grad_clip >= 0, f"{key}.grad_clip", ">= 0", self.grad_clip)
        _require(self.accumulation >= 1, f"{key}.accumulation", ">= 1", self.accumulation)
        _require(self.max_bad_steps >= 1, f"{key}.max_bad_steps", ">= 1", self.max_bad_steps)
        _require(self.log_every >= 1, f"{key}.log_every", ">= 1", self.log_every)
        _require(self.peak_tflops is None or self.peak_tflops > 0, f"{key}.peak_tflops", "null or > 0",
                 self.peak_tflops)
        _require(self.profile_steps >= 0, f"{key}.profile_steps", ">= 0", self.profile_steps)
        _require(self.profile_start >= 0, f"{key}.profile_start", ">= 0", self.profile_start)
        import signal

        catchable = sorted(s.name for s in signal.valid_signals() if isinstance(s, signal.Signals)
                           and s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD))
        for name in self.stop_signals:
            _require(name in catchable, f"{key}.stop_signals",
                     "a list of catchable signal names: " + ", ".join(catchable), self.stop_signals)


@dataclass
class EngineConfig:
    ds_config: str | None = None
    """The DeepSpeed JSON (the ZeRO stage lives there): a path or a shipped name (zero0, zero1, zero2, zero3,
    zero3_offload; zero0 for adapter-only runs, where nothing is worth sharding); null: the one an `accelerate
    launch` config names, else zero2."""
    collective_timeout: int = 1800
    """Seconds a collective may wait for a peer (one that died or hangs) before the run stops with a line saying a
    peer was lost."""
    zero3_leaf_blocks: bool = True
    """Under ZeRO-3, each tower block is one DeepSpeed leaf module: one set of hooks and one gather per block
    instead of one per layer inside it (docs/training.md, "ZeRO-3's hooks"); false: DeepSpeed's per-module hooks."""

    def validate(self, key: str) -> None:
        _require(self.collective_timeout >= 1, f"{key}.collective_timeout", ">= 1 (seconds)", self.collective_timeout)


@dataclass
class CheckpointConfig:
    every: int = 0
    """Steps between checkpoints; 0: only at the end."""
    keep: int = 2
    """Most recent checkpoints kept."""

    def validate(self, key: str) -> None:
        _require(self.every >= 0, f"{key}.every", ">= 0", self.every)
        _require(self.keep >= 1, f"{key}.keep", ">= 1", self.keep)


@dataclass
class EvalConfig:
    data: list[str] = field(default_factory=list)
    """Retrieval sets: shard specs or .jsonl files."""
    every: int = 0
    """Steps between evaluations; 0: only at the end."""
    at_start: bool = False
    """Also evaluate the untrained model (step 0)."""
    batch_size: int = 64
    """Images or captions encoded at once."""
    allow_outside_paths: bool = False
    """JSONL sets: read images outside the set's folder."""
    zero_shot: list[str] = field(default_factory=list)
    """Zero-shot classification sets: image folders with one subfolder per class
    (alignvl_scale/evaluation/zeroshot.py)."""

    def validate(self, key: str) -> None:
        _require(self.every >= 0, f"{key}.every", ">= 0", self.every)
        _require(self.batch_size >= 1, f"{key}.batch_size", ">= 1", self.batch_size)


@dataclass
class LogConfig:
    report_to: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    """Where scalars go besides RUN_DIR/metrics.jsonl: tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive,
    swanlab, trackio (through Accelerate; each reads its own environment, e.g. WANDB_MODE, MLFLOW_TRACKING_URI)."""
    project: str | None = None
    """The trackers' project or experiment name; null: the run folder's name."""
    hparams: list[str] = field(default_factory=lambda: [
        "loss.objective", "model.noise_sigma", "model.noise_mode", "loss.smoothing", "model.mixup",
        "data.caption_noise", "data.train_fraction", "seed", "train.lr"])
    """Config keys TensorBoard's hparams table compares runs by (with the final evaluation); the default is what
    the ablation studies vary, and the seed and learning rate."""
    sample_keys: bool = False
    """Write every step's sample keys, in the global batch's order, to RUN_DIR/sample_keys.jsonl (an audit of which
    samples trained together; one gather of the keys per step)."""

    def validate(self, key: str) -> None:
        for name in self.hparams:
            node: Any = RunConfig()
            for part in name.split("."):
                _require(hasattr(node, part), f"{key}.hparams", "a list of config keys (section.key)", self.hparams)
                node = getattr(node, part)
            _require(not dataclasses.is_dataclass(node), f"{key}.hparams", "a list of config keys, not sections",
                     self.hparams)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Towers, adapters, Random Perturbation, mixup."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Embedding Smoothing and the contrastive loss's computation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training shards and their reading."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Budget, optimizer, schedule, precision, logging."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Retrieval evaluation during and after training."""
    log: LogConfig = field(default_factory=LogConfig)
    """Experiment trackers."""
    run_dir: str = "runs/default"
    """Where the run writes: config, metrics, TensorBoard, checkpoints."""
    seed: int = 0
    """Seeds weights, data order, noise and mixup (per rank where it must differ)."""

    def validate(self) -> RunConfig:
        self.model.validate("model")
        self.loss.validate("loss")
        self.data.validate("data")
        self.train.validate("train", self.data)
        self.engine.validate("engine")
        self.checkpoint.validate("checkpoint")
        self.eval.validate("eval")
        self.log.validate("log")
        _require(not self.eval.zero_shot or self.data.kind != "features", "eval.zero_shot",
                 "empty when data.kind is features (that eval encodes cached features, not images; run "
                 "`alignvl-scale eval --zero-shot` on the export)", self.eval.zero_shot)
        _require(self.model.mixup != "fusemix" or self.data.batch_size % 2 == 0, "data.batch_size",
                 "even when model.mixup is fusemix (it mixes the batch's two halves)", self.data.batch_size)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def contrastive_batch(cfg: RunConfig, world: int) -> int:
    """Pairs in one step's loss: the samples all ranks read per step, halved by fusemix mixup
    (it mixes each rank's batch halves into pairs)."""
    samples = cfg.data.batch_size * cfg.train.accumulation * world
    return samples // 2 if cfg.model.mixup == "fusemix" else samples


def describe_batch(cfg: RunConfig, world: int) -> str:
    """`2 ranks x 6 x 2 accumulated = 24 samples mixed in pairs (fusemix) = contrastive batch 12`."""
    samples = cfg.data.batch_size * cfg.train.accumulation * world
    accumulated = f" x {cfg.train.accumulation} accumulated" if cfg.train.accumulation > 1 else ""
    mixed = f"{samples} samples mixed in pairs (fusemix) = " if cfg.model.mixup == "fusemix" else ""
    pairs = contrastive_batch(cfg, world)
    return f"{counted(world, 'rank')} x {cfg.data.batch_size}{accumulated} = {mixed}contrastive batch {pairs}"


def model_fingerprint(cfg: RunConfig) -> dict[str, object]:
    """What decides the trained model's parameters: a checkpoint resumes only into a run whose
    fingerprint is the same (world size, ZeRO stage, batch, schedule and the rest may change).
    Read from a completed config (a cached-feature run's dims and towers from its manifest)."""
    def tower(t: TowerConfig) -> str:
        return f"{t.kind}:{t.name}" if t.name else t.kind

    def training(t: TowerConfig) -> str:
        if not t.trainable:
            return "frozen"
        if t.finetune == "lora":
            targets = ",".join(t.lora.target_modules) if t.lora.target_modules else "default"
            return f"lora rank {t.lora.rank} on {targets}"
        return f"last {t.last_n} blocks" if t.finetune == "last_n" else "full"

    m = cfg.model
    return {"image_tower": tower(m.image_tower), "text_tower": tower(m.text_tower),
            "image_tower_training": training(m.image_tower), "text_tower_training": training(m.text_tower),
            "image_dim": m.image_dim, "text_dim": m.text_dim, "embed_dim": m.embed_dim,
            "adapter": f"mlp x {m.adapter_depth}" if m.adapter == "mlp" else m.adapter,
            "objective": cfg.loss.objective}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a YAML value against a field's type hint, converting where lossless."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as a boolean
        if value not in args:
            choices = " or ".join(args) if len(args) == 2 else "one of " + ", ".join(args)
            raise ConfigError(f"{key}: must be {choices}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {key}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown key{hint}; {prefix or 'top level'} takes {', '.join(sorted(names))}")
    kwargs = {name: _coerce(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    return cls(**kwargs)


def tower_config(values: dict, key: str) -> TowerConfig:
    """A TowerConfig from a mapping (as a feature manifest stores it), checked like a config file's."""
    return _build(TowerConfig, values, key)


def apply_override(tree: dict, override: str) -> None:
    """`a.b.c=value` with value parsed as YAML (numbers, lists, null, strings)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(tree: dict, validate: bool = True) -> RunConfig:
    """validate=False for configs saved with a run (re-read elsewhere: paths may differ;
    data.batch_size is resolved there)."""
    data = tree.get("data")
    if validate and isinstance(data, dict) and data.get("global_batch_size") is not None and "batch_size" in data:
        raise ConfigError(f"data.global_batch_size: set it ({data['global_batch_size']}) or data.batch_size "
                          f"({data['batch_size']}), not both: the per-rank batch is derived from the global one")
    cfg = _build(RunConfig, tree)
    return cfg.validate() if validate else cfg


def for_world(cfg: RunConfig, world: int) -> RunConfig:
    """The config as `world` ranks run it: data.batch_size derived from data.global_batch_size
    (a new config; without a global batch the same one)."""
    total = cfg.data.global_batch_size
    if total is None:
        return cfg
    per_step = world * cfg.train.accumulation
    _require(total % per_step == 0, "data.global_batch_size", f"a multiple of {counted(world, 'rank')} x "
             f"train.accumulation {cfg.train.accumulation} = {per_step}", total)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=total // per_step))
    _require(cfg.model.mixup != "fusemix" or cfg.data.batch_size % 2 == 0, "data.global_batch_size",
             f"such that the per-rank batch is even with model.mixup fusemix ({counted(world, 'rank')} give "
             f"{cfg.data.batch_size})", total)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    tree: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded or {}
    for override in overrides:
        apply_override(tree, override)
    return config_from_dict(tree)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right under it in the class body (the
    convention Sphinx reads), so that the meaning of a key is written once, next to it."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: " ".join(after.value.value.split())
            for node, after in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}


def annotated_yaml(cfg: Any, indent: int = 0) -> str:
    """The config as YAML that loads back to the same values, each key with its meaning as a comment."""
    lines, docs = [], field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value, pad = getattr(cfg, f.name), "  " * indent
        doc = f"  # {docs[f.name]}" if f.name in docs else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{doc}")
            lines.append(annotated_yaml(value, indent + 1))
        else:
            dumped = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
            lines.append(f"{pad}{f.name}: {dumped}{doc}")
    return "\n".join(lines)
