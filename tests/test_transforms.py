"""The fast augmentations against torchvision's PIL pipeline, on real photographs."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF

from dataset import transforms
from dataset.demo_data import sample_photos
from dataset.image_io import ImageDecodeError, decode_rgb
from dataset.transforms import (
    Box,
    ColorJitter,
    RandomChain,
    RandomResizedCropFlip,
    RandomScaleCropFlip,
    ResizeCenterCrop,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    apply_transform,
    image_header,
    sample_resized_crop_box,
)
from utils.errors import ConfigError

# Crops decoded alone (needs the region decoder) and whole images (OpenCV, always there).
REGION_OR_WHOLE = [pytest.param(True, id="region", marks=pytest.mark.region_decoder),
                   pytest.param(False, id="whole")]
TOLERANCE = 3.0  # mean absolute difference on 0..255 allowed against torchvision


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """scikit-learn's two photographs as JPEGs at their own 640 x 427, and enlarged (smoothly,
    so they stay natural images) to sizes where the crops allow 1/2 and 1/4 scaled decoding."""
    china, flower = (Image.fromarray(p) for p in sample_photos())
    return {
        "china": jpeg_bytes(china),
        "flower": jpeg_bytes(flower, quality=80),
        "flower_1400": jpeg_bytes(flower.resize((1400, 934), Image.Resampling.BICUBIC)),
        "china_2100": jpeg_bytes(china.resize((2100, 1401), Image.Resampling.BICUBIC)),
    }


@pytest.fixture()
def decodes(monkeypatch) -> dict[str, list[int]]:
    """The DCT scale factors the transforms decode at, in call order: 'whole' for whole-image
    decodes (OpenCV), 'window' for crops decoded alone (libjpeg-turbo)."""
    calls: dict[str, list[int]] = {"whole": [], "window": []}
    real_whole, real_window = transforms.decode_scaled, transforms.decode_window

    def whole(data: bytes, factor: int = 1) -> np.ndarray:
        calls["whole"].append(factor)
        return real_whole(data, factor)

    def window(decoder, data, width, height, box, factor=1):
        calls["window"].append(factor)
        return real_window(decoder, data, width, height, box, factor)

    monkeypatch.setattr(transforms, "decode_scaled", whole)
    monkeypatch.setattr(transforms, "decode_window", window)
    return calls


def pil_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def chw(image: Image.Image) -> np.ndarray:
    return np.asarray(image).transpose(2, 0, 1)


def crop_at(transform: RandomResizedCropFlip, sample: bytes | np.ndarray, box: Box,
            flip: bool) -> torch.Tensor:
    """The transform's output for a given box and flip: its deterministic half."""
    return transform._render(transforms._inspect(sample), box, flip)


def scale_crop_at(transform: RandomScaleCropFlip, sample: bytes | np.ndarray, shorter: int,
                  top: int, left: int, flip: bool) -> torch.Tensor:
    """RandomScaleCropFlip's output for given parameters: its deterministic half."""
    source = transforms._inspect(sample)
    new_w, new_h = transforms.shorter_side_size(source.width, source.height, shorter)
    return transforms._resize_and_crop(source, new_w, new_h, top, left, transform.size, flip)


def mean_abs_diff(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def check_output(out: torch.Tensor, size: int = 224) -> np.ndarray:
    """What every transform returns (a contiguous 3 x size x size uint8 tensor), as an array."""
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
    assert out.shape == (3, size, size)
    assert out.is_contiguous()
    return out.numpy()


# ---------------------------------------------------------------------------------------------
# The crop box: same distribution as torchvision's RandomResizedCrop.get_params.


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def box_features(boxes: np.ndarray, width: int, height: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(np.float64)
    return {"area": h * w / (width * height), "log_ratio": np.log(w / h),
            "centre_x": (left + w / 2) / width, "centre_y": (top + h / 2) / height}


@pytest.mark.parametrize("width,height", [(640, 427), (300, 300), (1000, 150), (120, 900)])
def test_crop_box_distribution_matches_torchvision(width, height):
    n = 4000
    random.seed(1)
    ours = np.array([sample_resized_crop_box(width, height, (0.08, 1.0), (3 / 4, 4 / 3))
                     for _ in range(n)])
    torch.manual_seed(1)
    image = torch.empty(1, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)])
    assert ((ours[:, 2] > 0) & (ours[:, 0] + ours[:, 2] <= height)).all()
    assert ((ours[:, 3] > 0) & (ours[:, 1] + ours[:, 3] <= width)).all()
    # 1.95 * sqrt(2 / n) is the KS critical value at the 0.1 % level.
    critical = 1.95 * math.sqrt(2 / n)
    ours_f, theirs_f = box_features(ours, width, height), box_features(theirs, width, height)
    for name in ours_f:
        assert ks_statistic(ours_f[name], theirs_f[name]) < critical, name


def test_crop_box_falls_back_to_torchvision_central_crop():
    random.seed(0)
    # So elongated that no sampled box fits: the central crop clamped to ratio 4/3.
    assert sample_resized_crop_box(4000, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == Box(0, 1993, 10, 13)
    assert sample_resized_crop_box(10, 4000, (0.9, 1.0), (3 / 4, 4 / 3)) == Box(1993, 0, 13, 10)


# ---------------------------------------------------------------------------------------------
# The pixels: for one fixed box and flip, within TOLERANCE of torchvision's PIL result.


def torchvision_resized_crop(data: bytes, box: Box, flip: bool, size: int = 224) -> np.ndarray:
    out = TF.resized_crop(pil_image(data), *box, [size, size], InterpolationMode.BILINEAR,
                          antialias=True)
    return chw(TF.hflip(out) if flip else out)


@pytest.mark.parametrize("region", REGION_OR_WHOLE)
@pytest.mark.parametrize("name,box,flip,factor", [
    ("china", Box(50, 80, 300, 400), False, 1),  # downscale
    ("flower", Box(40, 300, 150, 120), True, 1),  # upscale
    ("china", Box(0, 100, 427, 180), True, 1),  # down in height, up in width
    ("flower_1400", Box(100, 150, 800, 1000), False, 2),  # whole pixels at 1/2
    ("flower_1400", Box(101, 151, 733, 911), True, 2),  # a sub-pixel box at 1/2
    ("flower_1400", Box(211, 97, 571, 603), True, 2),  # 1/2 with 1.27 pixels per output pixel
    ("china_2100", Box(0, 301, 1401, 1777), False, 4),
])
def test_random_resized_crop_matches_torchvision(photos, decodes, name, box, flip, factor, region):
    out = crop_at(RandomResizedCropFlip(224, region=region), photos[name], box, flip)
    out = check_output(out)
    expected = {"window": [factor], "whole": []} if region else {"window": [], "whole": [factor]}
    assert decodes == expected
    assert mean_abs_diff(out, torchvision_resized_crop(photos[name], box, flip)) <= TOLERANCE


@pytest.mark.parametrize("name", ["flower_1400", "china_2100"])
@pytest.mark.region_decoder
def test_random_boxes_decoded_at_reduced_size_match_torchvision(photos, decodes, name):
    """Every drawn box that takes the reduced decode, down to the margin's edge, stays within
    the tolerance; boxes too small for it are skipped (the unscaled path is tested above)."""
    data, reference_image = photos[name], pil_image(photos[name])
    transform = RandomResizedCropFlip(224)
    random.seed(3)
    checked = 0
    for _ in range(30):
        box = sample_resized_crop_box(*reference_image.size, (0.08, 1.0), (3 / 4, 4 / 3))
        if min(box.height, box.width) < 2 * transforms.RANDOM_CROP_MARGIN * 224:
            continue
        out = crop_at(transform, data, box, False)
        assert decodes["window"][-1] > 1
        reference = chw(TF.resized_crop(reference_image, *box, [224, 224],
                                        InterpolationMode.BILINEAR, antialias=True))
        assert mean_abs_diff(out, reference) <= TOLERANCE, box
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("region", REGION_OR_WHOLE)
def test_unscaled_crops_are_torchvision_to_within_rounding(photos, region):
    out = crop_at(RandomResizedCropFlip(224, region=region), photos["china"], Box(50, 80, 300, 400),
                  True)
    reference = torchvision_resized_crop(photos["china"], Box(50, 80, 300, 400), True)
    assert mean_abs_diff(out, reference) < 0.5
    assert np.abs(out.numpy().astype(int) - reference).max() <= 2


@pytest.mark.parametrize("name", ["china", "flower", "flower_1400", "china_2100"])
@pytest.mark.region_decoder
def test_region_decoding_gives_the_whole_image_decode(photos, name):
    """Crops decoded alone are exactly the whole-image path's output, for boxes at every edge
    and block alignment, at full and reduced scale."""
    width, height = image_header(photos[name])[:2]
    boxes = [Box(0, 0, height, width), Box(0, 0, 100, 120), Box(height - 90, width - 77, 90, 77),
             Box(16, 32, 200, 160), Box(17, 33, 201, 161), Box(7, width - 300, height - 7, 300)]
    random.seed(11)
    boxes += [sample_resized_crop_box(width, height, (0.08, 1.0), (3 / 4, 4 / 3))
              for _ in range(20)]
    for box in boxes:
        region = crop_at(RandomResizedCropFlip(224, region=True), photos[name], box, False)
        whole = crop_at(RandomResizedCropFlip(224, region=False), photos[name], box, False)
        assert np.array_equal(region, whole), box


def test_decoded_arrays_give_what_file_bytes_give(photos):
    data, box = photos["flower"], Box(30, 60, 350, 420)
    from_bytes = crop_at(RandomResizedCropFlip(224), data, box, True)
    from_array = crop_at(RandomResizedCropFlip(224), decode_rgb(data), box, True)
    assert np.abs(from_bytes.numpy().astype(int) - from_array.numpy()).max() <= 1


def test_random_call_is_reproducible_and_varies(photos):
    transform = RandomResizedCropFlip(224)
    random.seed(5)
    first = [transform(photos["china"]) for _ in range(3)]
    random.seed(5)
    again = [transform(photos["china"]) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], first[1])


def test_min_scale_bounds_the_crop_area():
    random.seed(0)
    boxes = [sample_resized_crop_box(640, 427, (0.5, 1.0), (3 / 4, 4 / 3)) for _ in range(500)]
    areas = np.array([b.height * b.width for b in boxes]) / (640 * 427)
    assert areas.min() > 0.49 and areas.max() <= 1.0


@pytest.mark.parametrize("name,factor",
                         [("china", 1), ("flower", 1), ("flower_1400", 2), ("china_2100", 2)])
def test_validation_transform_matches_torchvision(photos, decodes, name, factor):
    out = ResizeCenterCrop(224)(photos[name])
    out = check_output(out)
    assert decodes["whole"] == [factor]
    reference = chw(T.CenterCrop(224)(T.Resize(256)(pil_image(photos[name]))))
    assert mean_abs_diff(out, reference) <= (0.5 if factor == 1 else TOLERANCE)


def test_validation_resize_follows_the_crop_size():
    assert ResizeCenterCrop(224).shorter == 256
    assert ResizeCenterCrop(160).shorter == 183  # round(160 / 0.875)


@pytest.mark.parametrize("name,shorter,top,left,flip", [
    ("china", 256, 0, 0, False), ("china", 480, 200, 411, True),
    ("flower_1400", 300, 30, 170, True),
])
def test_rand_scale_matches_torchvision_for_fixed_parameters(photos, name, shorter, top, left,
                                                             flip):
    out = scale_crop_at(RandomScaleCropFlip(224), photos[name], shorter, top, left, flip)
    out = check_output(out)
    resized = T.Resize(shorter)(pil_image(photos[name]))
    reference = TF.crop(resized, top, left, 224, 224)
    reference = chw(TF.hflip(reference) if flip else reference)
    assert mean_abs_diff(out, reference) <= TOLERANCE


def test_rand_scale_draws_shorter_side_position_and_flip_uniformly(photos):
    """Seeded, the transform equals apply() with its draws: the shorter side in [256, 480],
    then the crop position within the resized image, then the flip."""
    transform = RandomScaleCropFlip(224)
    width, height = 640, 427
    sides, flips = set(), set()
    for seed in range(6):
        random.seed(seed)
        out = transform(photos["china"])
        random.seed(seed)
        shorter = random.randint(256, 480)
        new_w, new_h = transforms.shorter_side_size(width, height, shorter)
        top, left = random.randint(0, new_h - 224), random.randint(0, new_w - 224)
        flip = random.random() < 0.5
        assert np.array_equal(out,
                              scale_crop_at(transform, photos["china"], shorter, top, left, flip))
        sides.add(shorter)
        flips.add(flip)
    assert len(sides) > 1 and flips == {True, False}


def test_rand_scale_rejects_sides_below_the_crop():
    with pytest.raises(ConfigError, match="min_side"):
        RandomScaleCropFlip(224, min_side=200)


# ---------------------------------------------------------------------------------------------
# Colour jitter.


@pytest.fixture(scope="module")
def small_photo() -> np.ndarray:
    return np.ascontiguousarray(sample_photos()[0][100:324, 200:424].transpose(2, 0, 1))


@pytest.mark.parametrize("factor", [0.6, 0.85, 1.0, 1.4])
@pytest.mark.parametrize("ours,theirs", [(adjust_brightness, TF.adjust_brightness),
                                         (adjust_contrast, TF.adjust_contrast),
                                         (adjust_saturation, TF.adjust_saturation)])
def test_colour_adjustments_match_torchvision(small_photo, ours, theirs, factor):
    out = ours(small_photo, factor)
    reference = chw(theirs(Image.fromarray(small_photo.transpose(1, 2, 0)), factor))
    assert out.dtype == np.uint8 and out.shape == small_photo.shape
    # PIL truncates blends where OpenCV rounds: one level at most.
    assert np.abs(out.astype(int) - reference).max() <= 1


def test_colour_jitter_applies_drawn_factors_in_a_random_order(small_photo):
    jitter = ColorJitter(0.4, 0.4, 0.4)
    orders, factors = set(), []
    for seed in range(12):
        random.seed(seed)
        out = jitter(small_photo)
        random.seed(seed)
        expected = small_photo
        order = []
        for fn, (lo, hi) in random.sample(jitter.adjustments, 3):
            factor = random.uniform(lo, hi)
            expected = fn(expected, factor)
            order.append(fn.__name__)
            factors.append(factor)
        assert np.array_equal(out, expected)
        orders.add(tuple(order))
    assert len(orders) > 1
    assert min(factors) >= 0.6 and max(factors) <= 1.4 and max(factors) - min(factors) > 0.4


def test_colour_jitter_ranges_follow_torchvision():
    ranges = {fn.__name__: bounds for fn, bounds in ColorJitter(0.4, 0.0, 1.5).adjustments}
    assert ranges == {"adjust_brightness": (0.6, 1.4), "adjust_saturation": (0.0, 2.5)}


def test_colour_jitter_changes_the_image(small_photo):
    random.seed(0)
    out = ColorJitter()(torch.from_numpy(small_photo))
    assert out.shape == small_photo.shape and out.dtype == torch.uint8
    assert mean_abs_diff(out, small_photo) > 1.0


# ---------------------------------------------------------------------------------------------
# Awkward files.


@pytest.mark.parametrize("region", REGION_OR_WHOLE)
@pytest.mark.parametrize("kind,decodable", [("png", False), ("cmyk", False), ("grey", True),
                                            ("progressive", True)])
def test_awkward_files_match_torchvision(photo_tree, decodes, kind, decodable, region):
    from tests.conftest import ODD_FILES

    with open(f"{photo_tree}/{ODD_FILES[kind]}", "rb") as f:
        data = f.read()
    box = Box(10, 20, 120, 150)
    out = crop_at(RandomResizedCropFlip(64, region=region), data, box, True)
    out = check_output(out, 64)
    assert mean_abs_diff(out, torchvision_resized_crop(data, box, True, 64)) <= 1.5
    assert bool(decodes["window"]) == (region and decodable)


@pytest.mark.region_decoder
def test_damaged_jpeg_data_falls_back_to_the_whole_image_decoders(photos, decodes):
    """A Huffman table that cannot be built, behind a header that parses: libjpeg-turbo's
    region decode fails, and the whole-image decoders say why, as without region decoding."""
    data = bytearray(photos["china"])
    table = data.index(b"\xff\xc4") + 5  # the first table's 16 code-length counts
    data[table:table + 16] = b"\xff" * 16
    errors = []
    for region in (True, False):
        with pytest.raises(ImageDecodeError) as caught:
            crop_at(RandomResizedCropFlip(224, region=region), bytes(data), Box(100, 100, 200, 200),
                    False)
        errors.append(str(caught.value))
    assert decodes["window"] == [1] and decodes["whole"] == [1, 1]
    assert errors[0] == errors[1] and "cannot decode" in errors[0]


@pytest.mark.parametrize("region", REGION_OR_WHOLE)
def test_truncated_jpeg_is_refused(photos, decodes, region):
    """A file cut short is an error, never a crop of libjpeg's grey filler rows: without the
    end marker the region decoder is not asked, and the whole-image path refuses the file."""
    cut = photos["china"][:len(photos["china"]) // 2]
    with pytest.raises(ImageDecodeError, match="truncated"):
        crop_at(RandomResizedCropFlip(224, region=region), cut, Box(0, 0, 100, 100), False)
    assert decodes == {"window": [], "whole": [1]}


def test_header_reads_size_and_kind(photos):
    png = io.BytesIO()
    Image.fromarray(sample_photos()[0]).save(png, format="PNG")
    assert image_header(photos["china"]) == (640, 427, True)
    assert image_header(png.getvalue()) == (640, 427, False)
    assert image_header(b"not an image") is None


@pytest.mark.parametrize("region", REGION_OR_WHOLE)
def test_undecodable_bytes_raise_an_image_decode_error(region):
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        RandomResizedCropFlip(224, region=region)(b"\x00" * 100)


# ---------------------------------------------------------------------------------------------
# Any transform, drawing from the sample's generator.


class Recorder:
    """A plain callable that takes the sample alone and notes what the global generators give."""

    def __init__(self) -> None:
        self.draws: list[tuple[float, float]] = []

    def __call__(self, sample):
        self.draws.append((random.random(), torch.rand(()).item()))
        return sample


def test_ours_are_handed_the_generator_and_others_the_sample_alone():
    seen = []

    class Ours(transforms.RandomTransform):
        def __call__(self, sample, rng=random):
            seen.append(rng)
            return sample

    rng = random.Random(3)
    assert apply_transform(Ours(), "sample", rng) == "sample" and seen == [rng]
    recorder = Recorder()
    assert apply_transform(recorder, "sample", rng) == "sample" and len(recorder.draws) == 1


def test_a_plain_callable_draws_from_the_sample_alone_and_leaves_the_globals_as_they_were():
    recorder = Recorder()
    random.seed(11)
    torch.manual_seed(11)
    before = (random.getstate(), torch.get_rng_state())
    apply_transform(recorder, None, random.Random("7/0/1"))
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])
    random.seed(99)  # other global states: the same sample still draws the same
    torch.manual_seed(99)
    apply_transform(recorder, None, random.Random("7/0/1"))
    apply_transform(recorder, None, random.Random("7/0/2"))
    assert recorder.draws[0] == recorder.draws[1] != recorder.draws[2]


def test_torchvision_compose_of_our_crop_and_v2_steps_draws_from_the_sample(photos):
    """v2.Compose calls our crop without a generator; it then draws from Python's generator,
    seeded from the sample's, so the whole pipeline depends on the sample's generator alone."""
    pipeline = v2.Compose([RandomResizedCropFlip(64), v2.RandAugment(), v2.RandomErasing(p=1.0)])

    def make(key: str) -> torch.Tensor:
        random.seed()  # whatever state a loader worker is in
        torch.seed()
        return apply_transform(pipeline, photos["china"], random.Random(key))

    first = make("5/0/3")
    assert first.dtype == torch.uint8 and first.shape == (3, 64, 64)
    assert torch.equal(make("5/0/3"), first) and not torch.equal(make("5/0/4"), first)
    chained = RandomChain(pipeline.transforms)
    assert torch.equal(chained(photos["china"], random.Random("5/0/3")),
                       chained(photos["china"], random.Random("5/0/3")))
