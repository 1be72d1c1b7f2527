"""Image transforms that run in DataLoader workers and at export/eval time: plain CPU code,
imported by the towers and the readers alike (the model never imports the training reader)."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """Resize the short side (bicubic; the long side truncated, as torchvision and
    transformers do), center crop, scale to [0, 1], normalize: PIL -> (3, S, S).
    `hf_processor()` is the same transform as a transformers image processor."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        short, long = sorted(img.size)
        long = max(self.size, int(self.size * long / short))
        w, h = (self.size, long) if img.width <= img.height else (long, self.size)
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std

    def hf_processor(self):
        """A CLIPImageProcessor that gives the same pixels (exports save it, so that
        `AutoImageProcessor.from_pretrained` preprocesses as training did)."""
        try:  # transformers 5: the PIL backend by name (its default wants torchvision, whose resize differs)
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:  # transformers 4: PIL is the backend
            from transformers import CLIPImageProcessor as Processor
        from transformers.image_utils import PILImageResampling

        return Processor(size={"shortest_edge": self.size}, crop_size={"height": self.size, "width": self.size},
                                  resample=PILImageResampling.BICUBIC, do_center_crop=True, do_rescale=True,
                                  rescale_factor=1 / 255, do_normalize=True, image_mean=self.mean.flatten().tolist(),
                                  image_std=self.std.flatten().tolist(), do_convert_rgb=True)


def random_resized_crop(img: Image.Image, rng: random.Random, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """The region torchvision's RandomResizedCrop picks (area a `scale` fraction of the image,
    aspect ratio log-uniform in `ratio`, 10 tries, else the largest centered crop within
    `ratio`), cropped out; resizing is left to the tower's transform. `rng` makes it
    reproducible per sample (the reader seeds it by seed, epoch and key)."""
    width, height = img.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return img.crop((left, top, left + w, top + h))
    w, h = (width, round(width / ratio[0])) if width / height < ratio[0] else (
        (round(height * ratio[1]), height) if width / height > ratio[1] else (width, height))
    left, top = (width - min(w, width)) // 2, (height - min(h, height)) // 2
    return img.crop((left, top, left + min(w, width), top + min(h, height)))
