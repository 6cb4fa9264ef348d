"""torchvision's crop, flip, resize and colour jitter, choosing the crop from the JPEG header
and decoding only what it needs: DCT-scaled (1/2, 1/4, 1/8) where that keeps enough pixels, just
the crop's window where ``dataset.jpeg_region`` can. Each returns a contiguous 3 x H x W RGB
uint8 tensor and draws from the ``rng`` it is given (``dataset.sampling``).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Callable, NamedTuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset import jpeg_region
from dataset.image_io import CV_COLOR_AT_SCALE, decode_rgb, imdecode, parse_jpeg_header
from utils.errors import ConfigError

Sample = Union[bytes, np.ndarray]  # image file bytes, or a decoded H x W x 3 RGB array
Rng = Union[random.Random, ModuleType]  # a random.Random, or the random module itself

# A DCT-scaled decode averages f x f blocks; resampling that at nearly 1:1 blurs each output
# pixel by its sub-pixel phase. Worst mean absolute error against torchvision over photos, for
# margins 1, 1.25 and 1.5: 2.6, 1.35 and 0.7 levels for random crops, 4.9, 3.0 and 2.0 for
# validation crops (0.2 unscaled); each takes the smallest well inside the 3-level tolerance.
REDUCED_DECODE_MARGIN = 1.5
RANDOM_CROP_MARGIN = 1.25


class Box(NamedTuple):
    """A crop in pixels of the full-size image, as torchvision's ``get_params`` returns it."""

    top: int
    left: int
    height: int
    width: int


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    height, width = (size, size) if isinstance(size, int) else size
    return int(height), int(width)


def sample_resized_crop_box(width: int, height: int, scale: Sequence[float],
                            ratio: Sequence[float], rng: Rng = random) -> Box:
    """torchvision RandomResizedCrop's box: ten tries of area and log-ratio sampling, then a
    central crop clamped to the ratio range."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return Box(rng.randint(0, height - h), rng.randint(0, width - w), h, w)
    w, h = width, height
    if width / height < min(ratio):
        h = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(height * max(ratio)))
    return Box((height - h) // 2, (width - w) // 2, h, w)


def shorter_side_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(shorter)``: the long side is truncated."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def image_header(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, is_jpeg) from the file's header alone; None when it cannot be parsed."""
    jpeg = parse_jpeg_header(data)
    if jpeg is not None:
        return jpeg.width, jpeg.height, True
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (*image.size, False)
    except Exception:  # PIL raises many types for unreadable headers; decoding reports them
        return None


def jpeg_reduction(width: float, height: float, need_width: float, need_height: float,
                   margin: float = REDUCED_DECODE_MARGIN) -> int:
    """The largest DCT scale-down factor that leaves width x height at least margin times
    need_width x need_height; 1 when none does."""
    for factor in (8, 4, 2):
        if width >= factor * margin * need_width and height >= factor * margin * need_height:
            return factor
    return 1


def decode_scaled(data: bytes, factor: int = 1) -> np.ndarray:
    """The image at 1/factor of its size (JPEG DCT scaling), H x W x 3 uint8 BGR; full size
    from ``decode_rgb`` where OpenCV cannot read it."""
    image = imdecode(data, CV_COLOR_AT_SCALE[factor])
    return image if image is not None else np.ascontiguousarray(decode_rgb(data)[:, :, ::-1])


def resize_antialiased(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """H x W x 3 -> 3 x height x width, antialiased bilinear (PIL's filter, to one level). A
    strided crop goes in as it is: copying it costs as much as the kernel's strided reads."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def resize_region(image: np.ndarray, region: tuple[float, float, float, float], height: int,
                  width: int) -> torch.Tensor:
    """Region (x0, y0, x1, y1) alone resized to 3 x height x width; a fractional one (left by a
    scaled decode) by PIL, the one library that resamples a sub-pixel box with this filter."""
    x0, y0, x1, y1 = region
    ix0, iy0 = math.floor(x0), math.floor(y0)
    ix1, iy1 = min(math.ceil(x1), image.shape[1]), min(math.ceil(y1), image.shape[0])
    crop = image[iy0:iy1, ix0:ix1]
    if (ix0, iy0, ix1, iy1) == (x0, y0, x1, y1):
        return resize_antialiased(crop, height, width)
    box = (x0 - ix0, y0 - iy0, min(x1, ix1) - ix0, min(y1, iy1) - iy0)
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize(
        (width, height), Image.Resampling.BILINEAR, box=box)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def _finish(image: torch.Tensor, flip: bool, bgr: bool) -> torch.Tensor:
    """3 x H x W -> RGB, mirrored if asked, contiguous (one copy at most)."""
    dims = ([0] if bgr else []) + ([2] if flip else [])
    return (image.flip(dims) if dims else image).contiguous()


class _Source(NamedTuple):
    """A sample ready to decode, with its full size."""

    sample: Sample  # file bytes, or a decoded RGB array
    width: int
    height: int
    is_jpeg: bool  # file bytes that DCT scaling applies to
    region_decodable: bool = False  # a whole greyscale or colour Huffman JPEG libjpeg-turbo crops


class _Decoded(NamedTuple):
    """Decoded pixels: the whole picture at some scale, or a window of it."""

    image: np.ndarray  # H x W x 3 uint8: BGR from OpenCV, RGB from libjpeg-turbo or as given
    scale_x: float  # decoded pixels per full-size pixel
    scale_y: float
    bgr: bool
    left: int = 0  # where image[0, 0] lies in the whole decoded picture
    top: int = 0

    def region(self, box: Box) -> tuple[float, float, float, float]:
        """box, in full-size pixels, as (x0, y0, x1, y1) in this array's pixels."""
        sx, sy = self.scale_x, self.scale_y
        return (box.left * sx - self.left, box.top * sy - self.top,
                (box.left + box.width) * sx - self.left, (box.top + box.height) * sy - self.top)


def _inspect(sample: Sample) -> _Source:
    if not isinstance(sample, np.ndarray):
        jpeg = parse_jpeg_header(sample)
        if jpeg is not None:
            return _Source(sample, jpeg.width, jpeg.height, True, jpeg.storable and jpeg.has_end)
        header = image_header(sample)  # PIL's parse, after a JPEG one that fails fast again
        if header is not None:
            return _Source(sample, *header)
        sample = decode_rgb(sample)  # no parsable header: this raises the error saying why
    return _Source(sample, sample.shape[1], sample.shape[0], False)


def decode_window(decoder: jpeg_region.RegionDecoder, data: bytes, width: int, height: int,
                  box: Box, factor: int = 1) -> _Decoded:
    """The rows and columns of box (full-size pixels) of a width x height JPEG at 1/factor,
    and one column more each side where there is one: libjpeg-turbo's chroma upsampling treats
    the window's outer columns as image edges, so those must lie outside box."""
    full_width, full_height = -(-width // factor), -(-height // factor)  # libjpeg rounds up
    x0 = max(0, math.floor(box.left / factor) - 1)
    x1 = min(full_width, math.ceil((box.left + box.width) / factor) + 1)
    y0 = math.floor(box.top / factor)
    y1 = min(full_height, math.ceil((box.top + box.height) / factor))
    image, first_column = decoder.decode(data, x0, y0, x1 - x0, y1 - y0, factor)
    return _Decoded(image, 1.0 / factor, 1.0 / factor, False, first_column, y0)


def _decode(source: _Source, factor: int, box: Box | None = None) -> _Decoded:
    """Decode at 1/factor, only box's window where one is given and can be. A whole image's
    scales come from the result, which a full-size fallback or a wrong header may size otherwise."""
    if isinstance(source.sample, np.ndarray):
        return _Decoded(source.sample, 1.0, 1.0, False)
    if box is not None and source.region_decodable and (decoder := jpeg_region.region_decoder()):
        try:
            return decode_window(decoder, source.sample, source.width, source.height, box, factor)
        except jpeg_region.RegionDecodeError:
            pass  # damaged data: the whole-image decoders below decode what they can or say why
    image = decode_scaled(source.sample, factor)
    height, width = image.shape[:2]
    if (height, width) == (-(-source.height // factor), -(-source.width // factor)):
        return _Decoded(image, 1.0 / factor, 1.0 / factor, True)
    return _Decoded(image, width / source.width, height / source.height, True)


class RandomTransform:
    """A transform that draws its random parameters from the generator it is called with,
    ``transform(sample, rng)``, so that ``apply_transform`` can hand it a sample's own."""

    def __call__(self, sample: Any, rng: Rng = random) -> torch.Tensor:
        raise NotImplementedError


def apply_transform(transform: Callable[..., Any], sample: Any, rng: Rng) -> Any:
    """``transform`` applied to sample, every random draw in it coming from rng: ours are handed
    rng; any other callable (``torchvision.transforms.v2``) runs with torch's and Python's
    generators seeded from rng and restored afterwards, so not the worker decides its draws."""
    if isinstance(transform, RandomTransform):
        return transform(sample, rng)
    seed = rng.getrandbits(63)
    # The CPU generator alone: torch.manual_seed would also reseed the GPUs' generators, which
    # nothing here restores, and costs about 0.2 ms a call where this costs microseconds.
    generator = torch.default_generator
    torch_state, python_state = generator.get_state(), random.getstate()
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        return transform(sample)
    finally:
        generator.set_state(torch_state)
        random.setstate(python_state)


class RandomResizedCropFlip(RandomTransform):
    """torchvision's RandomResizedCrop(size, scale, ratio), then RandomHorizontalFlip(flip_p).
    region: decode only the crop, where ``dataset.jpeg_region`` can."""

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 region: bool = True) -> None:
        self.size = as_size(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = flip_p
        self.region = region

    def __call__(self, sample: Sample, rng: Rng = random) -> torch.Tensor:
        source = _inspect(sample)
        box = sample_resized_crop_box(source.width, source.height, self.scale, self.ratio, rng)
        return self._render(source, box, rng.random() < self.flip_p)

    def _render(self, source: _Source, box: Box, flip: bool) -> torch.Tensor:
        out_h, out_w = self.size
        factor = (jpeg_reduction(box.width, box.height, out_w, out_h, RANDOM_CROP_MARGIN)
                  if source.is_jpeg else 1)
        decoded = _decode(source, factor, box if self.region else None)
        return _finish(resize_region(decoded.image, decoded.region(box), out_h, out_w), flip,
                       decoded.bgr)


def _resize_and_crop(source: _Source, new_w: int, new_h: int, top: int, left: int,
                     size: tuple[int, int], flip: bool) -> torch.Tensor:
    """torchvision's Resize to new_w x new_h, then the size crop at (top, left). The whole image
    is resized, so the crop's border pixels see the filter support a resize-then-crop gives."""
    factor = jpeg_reduction(source.width, source.height, new_w, new_h) if source.is_jpeg else 1
    decoded = _decode(source, factor)
    resized = resize_antialiased(decoded.image, new_h, new_w)
    return _finish(resized[:, top:top + size[0], left:left + size[1]], flip, decoded.bgr)


class RandomScaleCropFlip(RandomTransform):
    """The original's 'rand_scale': shorter side uniform in [min_side, max_side], a uniformly
    placed crop of size (torchvision's RandomCrop), horizontal flip with probability flip_p."""

    def __init__(self, size: int | Sequence[int], min_side: int = 256, max_side: int = 480,
                 flip_p: float = 0.5) -> None:
        self.size = as_size(size)
        if not max(self.size) <= min_side <= max_side:
            raise ConfigError(f"rand_scale needs crop size {self.size} <= min_side {min_side} <= "
                              f"max_side {max_side}")
        self.min_side, self.max_side, self.flip_p = min_side, max_side, flip_p

    def __call__(self, sample: Sample, rng: Rng = random) -> torch.Tensor:
        source = _inspect(sample)
        shorter = rng.randint(self.min_side, self.max_side)
        new_w, new_h = shorter_side_size(source.width, source.height, shorter)
        top, left = rng.randint(0, new_h - self.size[0]), rng.randint(0, new_w - self.size[1])
        return _resize_and_crop(source, new_w, new_h, top, left, self.size,
                                rng.random() < self.flip_p)


class ResizeCenterCrop:
    """Validation, torchvision's convention: shorter side to round(size / 0.875) (256 for 224),
    centre crop of size."""

    def __init__(self, size: int | Sequence[int], resize_ratio: float = 0.875) -> None:
        self.size = as_size(size)
        self.shorter = int(round(max(self.size) / resize_ratio))

    def __call__(self, sample: Sample) -> torch.Tensor:
        source = _inspect(sample)
        new_w, new_h = shorter_side_size(source.width, source.height, self.shorter)
        top = int(round((new_h - self.size[0]) / 2.0))
        left = int(round((new_w - self.size[1]) / 2.0))
        return _resize_and_crop(source, new_w, new_h, top, left, self.size, flip=False)


def _planes(image: np.ndarray) -> np.ndarray:
    """A 3 x H x W array as one (3H) x W plane, the 2-D shape OpenCV's arithmetic takes."""
    return np.ascontiguousarray(image).reshape(-1, image.shape[-1])


def luma(image: np.ndarray) -> np.ndarray:
    """PIL's 'L' conversion of a 3 x H x W RGB array: ITU-R 601 weights in 16-bit fixed point."""
    r, g, b = (plane.astype(np.uint32) for plane in image)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black: image * factor, saturated."""
    flat = _planes(image)
    return cv2.addWeighted(flat, factor, flat, 0.0, 0.0).reshape(image.shape)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level, rounded as PIL's ImageEnhance.Contrast rounds it."""
    mean = int(luma(image).mean() + 0.5)
    flat = _planes(image)
    return cv2.addWeighted(flat, factor, flat, 0.0, (1.0 - factor) * mean).reshape(image.shape)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend each channel with the image's own grey levels."""
    grey = luma(image)
    return np.stack([cv2.addWeighted(np.ascontiguousarray(plane), factor, grey, 1.0 - factor, 0.0)
                     for plane in image])


class ColorJitter(RandomTransform):
    """torchvision's ColorJitter(brightness, contrast, saturation) on a 3 x H x W RGB uint8
    tensor (or array): each factor uniform in [max(0, 1 - v), 1 + v], applied in a random order."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4) -> None:
        self.adjustments = [(fn, (max(0.0, 1.0 - v), 1.0 + v))
                            for fn, v in ((adjust_brightness, brightness),
                                          (adjust_contrast, contrast),
                                          (adjust_saturation, saturation)) if v > 0]

    def __call__(self, image: torch.Tensor | np.ndarray, rng: Rng = random) -> torch.Tensor:
        array = image.numpy() if isinstance(image, torch.Tensor) else image
        for fn, (lo, hi) in rng.sample(self.adjustments, len(self.adjustments)):
            array = fn(array, rng.uniform(lo, hi))
        return torch.from_numpy(np.ascontiguousarray(array))


class RandomChain(RandomTransform):
    """Steps applied in turn by ``apply_transform``, all drawing from the generator the call is
    given. ``v2.Compose`` of them is as reproducible, with other draws (it passes no generator)."""

    def __init__(self, steps: Sequence[Callable[..., Any]]) -> None:
        self.steps = list(steps)

    def __call__(self, sample: Any, rng: Rng = random) -> Any:
        for step in self.steps:
            sample = apply_transform(step, sample, rng)
        return sample
