"""A trained model as a Hugging Face folder that transformers alone loads: `export --format hf`
writes the weights, the code that runs them (model/portable.py, as modeling_alignvl.py, named by
`auto_map`), one processor for images and captions, and a model card.

    from transformers import AutoModel, AutoProcessor, pipeline
    model = AutoModel.from_pretrained("exported_hf/", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained("exported_hf/", trust_remote_code=True)
    out = model(**processor(text=["a dog", "a cat"], images=[image], return_tensors="pt"))
    out.logits_per_image, out.image_embeds, out.text_embeds     # embeddings unit norm
    pipeline("zero-shot-image-classification", model="exported_hf/", trust_remote_code=True)

The folder: config.json (both towers' architectures inline, the head's settings; model type
`alignvl`, or `alignvl_siglip` for the sigmoid objective, whose zero-shot scores the pipeline
then reads as sigmoids), model.safetensors (fp32), modeling_alignvl.py, the text tower's
tokenizer as trained (model_max_length the run's max_length, its padding side), the image
processor (the tower's own, or the trained transform as a CLIPImageProcessor: the same pixels),
processor_config.json (the caption prefix and length), README.md. Embeddings equal
`load_encoder`'s. With this package imported, the same classes load without remote code.
Nothing local leaves with it: paths (data, run folder, local tower folders) are reduced to
their last part.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from alignvl_scale.config import MAX_LOGIT_SCALE, RunConfig, TowerConfig
from alignvl_scale.evaluation.metrics import headline
from alignvl_scale.losses.registry import OBJECTIVES
from alignvl_scale.model import portable
from alignvl_scale.model.head import AlignVLModel
from alignvl_scale.model.portable import AlignVLConfig, AlignVLProcessor, AlignVLSiglipConfig
from alignvl_scale.model.towers import ProcessorTransform

MODELING = "modeling_alignvl.py"  # model/portable.py, as the export carries it
PROCESSOR_CONFIG = "processor_config.json"

for _config, _model in portable.MODEL_CLASSES.items():  # the package's own classes, without remote code
    AutoConfig.register(_config.model_type, _config)
    AutoModel.register(_config, _model)
    AutoModelForZeroShotImageClassification.register(_config, _model)
    AutoProcessor.register(_config, AlignVLProcessor)


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
    lines = ["---", "library_name: transformers", "pipeline_tag: zero-shot-image-classification",
             "tags: [alignvl-scale, vision-language, contrastive]", "---", "", "# Align-VL dual encoder", "",
             "Trained with alignvl-scale (Random Perturbation + Embedding Smoothing on FuseMix-style adapters). "
             "transformers alone runs it; the model's code comes with it (`modeling_alignvl.py`):", "", "```python",
             "from transformers import AutoModel, AutoProcessor",
             "model = AutoModel.from_pretrained(MODEL, trust_remote_code=True)",
             "processor = AutoProcessor.from_pretrained(MODEL, trust_remote_code=True)",
             "out = model(**processor(text=[\"a dog\", \"a cat\"], images=[image], return_tensors=\"pt\"))"
             "  # out.logits_per_image", "```", "",
             "Or `pipeline(\"zero-shot-image-classification\", model=MODEL, trust_remote_code=True)`"
             + (f" with `hypothesis_template=\"{cfg.model.text_tower.prefix}...{{}}\"`: the pipeline tokenizes labels "
                "itself, without the prefix the text tower was trained with" if cfg.model.text_tower.prefix else "")
             + ". The processor adds the text tower's prefix and pads and truncates captions as training did.", "",
             "| | |", "|---|---|"]
    for modality in ("image", "text"):
        tower = m[f"{modality}_tower"]
        lines.append(f"| {modality} tower | {_cell(tower['name'] or tower['kind'])} ({_cell(tower['pooling'])} "
                     f"pooling, {'trained' if tower['trainable'] else 'frozen'}) |")
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


def hf_config(model: AlignVLModel, cfg: RunConfig) -> AlignVLConfig:
    """The export's config.json: both towers (model/portable.py `Tower` specs, local paths
    reduced), the text tower's tokenization as trained, the head, and the public run config."""
    text = cfg.model.text_tower
    towers = [_tower_spec(t) for t in (model.image_tower, model.text_tower)]
    towers[1].update(max_length=text.max_length, prefix=text.prefix, padding_side=text.padding_side)
    head = model.head
    config_class = AlignVLSiglipConfig if head.objective.calibration == "sigmoid" else AlignVLConfig
    config = config_class(image_tower=towers[0], text_tower=towers[1], run=public_run_config(cfg.to_dict()), head={
        "adapter": cfg.model.adapter, "adapter_depth": cfg.model.adapter_depth, "dropout": cfg.model.dropout,
        "image_dim": model.image_tower.output_dim, "text_dim": model.text_tower.output_dim,
        "embed_dim": cfg.model.embed_dim, "max_logit_scale": MAX_LOGIT_SCALE, "logit_bias": head.logit_bias is not None,
        "objective": head.objective.name})
    module, model_class = Path(MODELING).stem, portable.MODEL_CLASSES[config_class].__name__
    config.auto_map = {"AutoConfig": f"{module}.{config_class.__name__}", "AutoModel": f"{module}.{model_class}",
                       "AutoModelForZeroShotImageClassification": f"{module}.{model_class}"}
    config.architectures = [model_class]
    return config


def _tower_spec(tower) -> dict:
    """How model/portable.py `Tower` rebuilds it, with no local path."""
    spec = dict(tower.spec)
    if "config" in spec:
        spec["config"] = {k: v for k, v in spec["config"].items() if k not in ("_name_or_path", "name_or_path")}
    return public_run_config(spec)


def processor_of(preprocessing, text: TowerConfig) -> AlignVLProcessor:
    """The run's image transform and tokenizer as one processor, the tokenizer saved as it was
    used (model_max_length, padding side, truncation at the end, not the prefix's)."""
    image = preprocessing.image_transform
    image_processor = image.processor if isinstance(image, ProcessorTransform) else image.hf_processor()
    tokenizer = preprocessing.tokenize.tokenizer
    tokenizer.model_max_length, tokenizer.padding_side, tokenizer.truncation_side = (text.max_length,
                                                                                     text.padding_side, "right")
    return AlignVLProcessor(image_processor, tokenizer, prefix=text.prefix, max_length=text.max_length)


def save_hf(model: AlignVLModel, cfg: RunConfig, preprocessing, out: Path, summary: dict | None = None) -> Path:
    """`model` (loaded with the trained weights) as a transformers folder at `out`."""
    config = hf_config(model, cfg)
    hf_model = portable.MODEL_CLASSES[type(config)](config)
    hf_model.load_state_dict({k.removeprefix("head."): v for k, v in model.state_dict().items()}, strict=True)
    hf_model.save_pretrained(out)
    shutil.copyfile(portable.__file__, out / MODELING)
    processor_of(preprocessing, cfg.model.text_tower).save_pretrained(out)
    processor_config = json.loads((out / PROCESSOR_CONFIG).read_text()) if (out / PROCESSOR_CONFIG).exists() else {}
    processor_config.update(processor_class="AlignVLProcessor",
                            auto_map={"AutoProcessor": f"{Path(MODELING).stem}.AlignVLProcessor"})
    (out / PROCESSOR_CONFIG).write_text(json.dumps(processor_config, indent=2))
    (out / "README.md").write_text(model_card(cfg, summary))
    return out


def push_to_hub(folder: Path, repo_id: str, api=None, private: bool = True) -> str:
    """Upload an HF folder with huggingface_hub (`api`: an HfApi, replaceable in tests)."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="alignvl-scale export")
    return f"https://huggingface.co/{repo_id}"
