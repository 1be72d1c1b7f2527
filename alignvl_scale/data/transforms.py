"""Image transforms that run in DataLoader workers and at export/eval time: plain CPU code,
imported by the towers and the readers alike (the model never imports the training reader)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """Resize the short side, center crop, scale to [0, 1], normalize: PIL -> (3, S, S)."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        scale = self.size / min(img.size)
        w, h = max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std
