"""A trained model as a Hugging Face `transformers` model: `export --format hf` writes a
folder that `AutoModel.from_pretrained` loads with no remote code, once this module is
imported (it registers the `alignvl` model type with the Auto classes):

    import alignvl_scale.export.hf  # noqa: F401  (registers AlignVLConfig / AlignVLHFModel)
    from transformers import AutoModel, AutoProcessor, AutoTokenizer
    model = AutoModel.from_pretrained("exported_hf/")
    image_emb = model.get_image_features(pixel_values=...)     # unit norm, (B, embed_dim)
    text_emb = model.get_text_features(input_ids=..., attention_mask=...)

The folder: config.json (both towers' architectures inline, the Align-VL head's settings),
model.safetensors (fp32), the text tower's tokenizer files, the image processor (the
tower's own, or the trained transform as a CLIPImageProcessor: same pixels with
backend="pil"), and README.md (a model card). The towers keep the pooling they were
trained with, so the embeddings equal `load_encoder`'s. Nothing local leaves with it: the
run config in config.json and the card has its paths (data, run folder, local tower
folders) reduced to their last part.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from alignvl_scale.config import ConfigError, RunConfig, config_from_dict
from alignvl_scale.data.transforms import ImageTransform
from alignvl_scale.evaluation.metrics import headline
from alignvl_scale.losses.registry import OBJECTIVES
from alignvl_scale.model.head import AlignVLModel, build_model
from alignvl_scale.model.towers import HFTower, ProcessorTransform, Tokenize

INSTALL = "pip install alignvl-scale"  # the package that registers the model type


class AlignVLConfig(PretrainedConfig):
    model_type = "alignvl"

    def __init__(self, image_tower: dict | None = None, text_tower: dict | None = None, run: dict | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.image_tower = image_tower or {}  # the image tower's transformers config, as a dict
        self.text_tower = text_tower or {}
        self.run = run or {}  # the run config (RunConfig.to_dict()): head settings, tower pooling


class AlignVLHFModel(PreTrainedModel):
    config_class = AlignVLConfig
    base_model_prefix = "alignvl"
    main_input_name = "pixel_values"

    def __init__(self, config: AlignVLConfig) -> None:
        super().__init__(config)
        run = config_from_dict(config.run, validate=False)
        towers = [HFTower(getattr(run.model, f"{m}_tower"), m, run.data, load_weights=False,
                          hf_config=AutoConfig.for_model(**getattr(config, f"{m}_tower"))) for m in ("image", "text")]
        head = build_model(_feature_config(run, towers)).head
        self.alignvl = AlignVLModel(head, *towers)
        self.alignvl.eval()
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The weights always come from the export."""

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.alignvl.head.encode_image(self.alignvl.image_tower(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        features = self.alignvl.text_tower(input_ids=input_ids, attention_mask=attention_mask)
        return self.alignvl.head.encode_text(features)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_) -> ModelOutput:
        out = ModelOutput()
        if pixel_values is not None:
            out["image_embeds"] = self.get_image_features(pixel_values)
        if input_ids is not None:
            out["text_embeds"] = self.get_text_features(input_ids, attention_mask)
        if pixel_values is not None and input_ids is not None:
            head = self.alignvl.head
            logits = head.temperature().reshape(()) * out["image_embeds"] @ out["text_embeds"].T
            if head.logit_bias is not None:  # sigmoid objectives: sigmoid(logits) is a match probability
                logits = logits + head.logit_bias().reshape(())
            out["logits_per_image"] = logits
            out["logits_per_text"] = out["logits_per_image"].T
        return out


def _feature_config(run: RunConfig, towers: list[HFTower]) -> RunConfig:
    """The run config with the towers' output sizes filled, so `build_model` makes the head
    alone (the towers are built here from the inline configs)."""
    import dataclasses

    model = dataclasses.replace(run.model, image_dim=towers[0].output_dim, text_dim=towers[1].output_dim)
    return dataclasses.replace(run, model=model, data=dataclasses.replace(run.data, kind="features"))


AutoConfig.register("alignvl", AlignVLConfig)
AutoModel.register(AlignVLConfig, AlignVLHFModel)


def _local(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../")) or Path(value).expanduser().exists()


def public_run_config(tree: dict) -> dict:
    """The run config without local paths: run_dir, data and eval paths, and tower names
    that are local folders become their last part (Hub ids stay)."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return Path(value).name if isinstance(value, str) and _local(value) else value

    return clean(tree)


def _cell(text: object) -> str:
    """A value as a Markdown table cell: code, with the characters that would end the span
    or the cell escaped."""
    return "`" + re.sub(r"([`|\\])", r"\\\1", str(text)).replace("\n", " ") + "`"


def model_card(cfg: RunConfig, summary: dict | None) -> str:
    """README.md of the HF folder: what to install, towers, data, the run config (no local
    paths), final retrieval numbers."""
    run = public_run_config(cfg.to_dict())
    m, data = run["model"], run["data"]
    lines = ["---", "library_name: transformers", "tags: [alignvl-scale, vision-language, contrastive]", "---", "",
             "# Align-VL dual encoder", "",
             "Trained with alignvl-scale (Random Perturbation + Embedding Smoothing on FuseMix-style adapters). "
             "The `alignvl` model type comes with that package, not with transformers: `" + INSTALL + "`, then "
             "`import alignvl_scale.export.hf` before `AutoModel.from_pretrained(...)` (no remote code). For exactly "
             "the "
             "training pixels, `AutoImageProcessor.from_pretrained(..., backend=\"pil\")`.", "",
             "| | |", "|---|---|"]
    for modality in ("image", "text"):
        tower = m[f"{modality}_tower"]
        lines.append(f"| {modality} tower | {_cell(tower['name'])} ({_cell(tower['pooling'])} pooling, "
                     f"{'trained' if tower['trainable'] else 'frozen'}) |")
    mix = cfg.model
    lines += [f"| adapters | {_cell(mix.adapter)} (depth {mix.adapter_depth}) -> {mix.embed_dim}-d |",
              f"| latent mixup | {_cell(mix.mixup)}" + (f", Beta({mix.mixup_beta:g}, {mix.mixup_beta:g})"
                                                         if mix.mixup != "off" else "") + " |",
              f"| Random Perturbation sigma | {mix.noise_sigma} ({_cell(mix.noise_mode)}) |",
              f"| objective | {_cell(cfg.loss.objective)}: {OBJECTIVES[cfg.loss.objective].description} |",
              f"| Embedding Smoothing alpha | {cfg.loss.smoothing} |",
              f"| training data | {', '.join(_cell(d) for d in data['train']) or '-'} |", ""]
    final = (summary or {}).get("eval", {})
    if final:
        lines += ["## Final evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(k.removeprefix('eval/'))} | {v:.2f} |" for k, v in final.items() if headline(k)]
        lines.append("")
    lines += ["## Run config", "", "```yaml", yaml.safe_dump(run, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def save_hf(model: AlignVLModel, cfg: RunConfig, preprocessing, out: Path, summary: dict | None = None) -> Path:
    """`model` (loaded with the trained weights) as an HF folder at `out`."""
    towers = (model.image_tower, model.text_tower)
    if not all(isinstance(t, HFTower) for t in towers):
        raise ConfigError("export --format hf: both towers must be transformers models (model.*_tower.kind: hf); "
                          f"this run has {cfg.model.image_tower.kind} and {cfg.model.text_tower.kind}")
    tower_configs = [public_run_config({k: v for k, v in t.model.config.to_dict().items() if k != "_name_or_path"})
                     for t in towers]
    config = AlignVLConfig(image_tower=tower_configs[0], text_tower=tower_configs[1],
                           run=public_run_config(cfg.to_dict()),
                           alignvl_install=f"{INSTALL}; import alignvl_scale.export.hf")
    hf_model = AlignVLHFModel(config)
    hf_model.alignvl.load_state_dict(model.state_dict(), strict=True)
    hf_model.save_pretrained(out)
    for prep in (preprocessing.image_transform, preprocessing.tokenize):
        if isinstance(prep, Tokenize):
            prep.tokenizer.save_pretrained(out)
        if isinstance(prep, ProcessorTransform):
            prep.processor.save_pretrained(out)
        if isinstance(prep, ImageTransform):  # no processor of its own: the trained transform as one
            prep.hf_processor().save_pretrained(out)
    (out / "README.md").write_text(model_card(cfg, summary))
    return out


def push_to_hub(folder: Path, repo_id: str, api=None, private: bool = True) -> str:
    """Upload an HF folder with huggingface_hub (`api`: an HfApi, replaceable in tests)."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="alignvl-scale export")
    return f"https://huggingface.co/{repo_id}"
