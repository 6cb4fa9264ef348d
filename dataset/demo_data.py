"""ImageNet-layout trees of real images that installed packages ship, for tests, benchmarks and the demo.

scikit-learn bundles two colour photographs and 1,797 handwritten digits; nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photographs (427 x 640 RGB)."""
    from sklearn.datasets import load_sample_images

    return [np.asarray(img) for img in load_sample_images().images]


def random_photo(photos: list[np.ndarray], rng: np.random.Generator, side_range: tuple[int, int]) -> Image.Image:
    """A random crop of a random photo, resized so its longer side lies in side_range."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(photo[y:y + ch, x:x + cw])
    side = int(rng.integers(side_range[0], side_range[1] + 1))
    scale = side / max(ch, cw)
    return crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)


def write_photo_tree(root: str, images_per_class: dict[str, int], num_classes: int = 4,
                     side_range: tuple[int, int] = (96, 160), quality_range: tuple[int, int] = (75, 95),
                     seed: int = 0) -> list[str]:
    """Write ``root/<split>/<wnid>/<wnid>_<i>.JPEG`` photos; returns the sorted class names."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    classes = [f"n{index:08d}" for index in range(num_classes)]
    for split, count in images_per_class.items():
        for wnid in classes:
            folder = os.path.join(root, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image = random_photo(photos, rng, side_range)
                quality = int(rng.integers(quality_range[0], quality_range[1] + 1))
                image.save(os.path.join(folder, f"{wnid}_{i}.JPEG"), quality=quality)
    return classes


def write_digits_tree(root: str, val_fraction: float = 0.2, size: int = 32, seed: int = 0) -> dict[str, int]:
    """scikit-learn's handwritten digits as RGB JPEGs in ``root/{train,val}/<digit>/``.

    The split is stratified and fixed by seed. Returns the number of images per split.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        num_val = int(round(len(indices) * val_fraction))
        for rank, index in enumerate(indices):
            split = "val" if rank < num_val else "train"
            folder = os.path.join(root, split, f"digit_{label}")
            os.makedirs(folder, exist_ok=True)
            grey = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB")
            image.save(os.path.join(folder, f"{index:04d}.JPEG"), quality=95)
            counts[split] += 1
    return counts
