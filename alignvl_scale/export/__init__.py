"""A checkpoint as weights others can use: a safetensors folder for `load_encoder` and `eval`,
or a transformers folder (export/hf.py)."""

from alignvl_scale.export.exporter import export, export_hf, load_encoder

__all__ = ["export", "export_hf", "load_encoder"]
