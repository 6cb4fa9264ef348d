"""What the packer stores as is and what it converts, on the awkward files ImageNet really has."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from dataset.image_io import (
    ImageDecodeError,
    decode_rgb,
    parse_jpeg_header,
    prepare_for_storage,
    resize_shorter_side,
)
from tests.conftest import ODD_FILES, truncate_file


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("name, storable", [("grey", True), ("progressive", True), ("cmyk", False)])
def test_header_tells_storable_jpegs(photo_tree, name, storable):
    header = parse_jpeg_header(read(os.path.join(photo_tree, ODD_FILES[name])))
    assert header is not None and header.has_end
    assert header.storable is storable
    assert header.components == {"grey": 1, "progressive": 3, "cmyk": 4}[name]
    assert header.frame_marker == (0xC2 if name == "progressive" else 0xC0)
    with Image.open(os.path.join(photo_tree, ODD_FILES[name])) as image:
        assert (header.width, header.height) == image.size


def test_header_rejects_non_jpeg_and_sees_truncation(photo_tree, tree_copy):
    assert parse_jpeg_header(read(os.path.join(photo_tree, ODD_FILES["png"]))) is None
    assert parse_jpeg_header(b"") is None
    path = os.path.join(tree_copy, "train", "n00000000", "n00000000_0.JPEG")
    truncate_file(path, keep_fraction=0.7)
    header = parse_jpeg_header(read(path))
    assert header is not None and not header.has_end


def test_plain_jpeg_is_kept_byte_for_byte(photo_tree):
    data = read(os.path.join(photo_tree, "train", "n00000001", "n00000001_2.JPEG"))
    stored, kept = prepare_for_storage(data)
    assert kept and stored == data


@pytest.mark.parametrize("name", ["png", "cmyk"])
def test_oddities_become_rgb_jpegs_with_pil_colours(photo_tree, name):
    data = read(os.path.join(photo_tree, ODD_FILES[name]))
    stored, kept = prepare_for_storage(data)
    assert not kept
    header = parse_jpeg_header(stored)
    assert header is not None and header.storable and header.components == 3
    difference = np.abs(pil_rgb(stored) - pil_rgb(data))
    assert difference.mean() < 2.0  # JPEG at quality 95 vs PIL's own conversion of the original


@pytest.mark.parametrize("keep_fraction", [0.3, 0.9])
@pytest.mark.parametrize("name", ["progressive", "png", "cmyk"])
def test_truncated_files_are_refused(tree_copy, name, keep_fraction):
    path = os.path.join(tree_copy, ODD_FILES[name])
    truncate_file(path, keep_fraction)
    with pytest.raises(ImageDecodeError):
        prepare_for_storage(read(path))


def test_damaged_jpeg_data_is_refused(photo_tree):
    data = bytearray(read(os.path.join(photo_tree, "train", "n00000002", "n00000002_1.JPEG")))
    counts = data.index(b"\xff\xc4") + 5  # the 16 code-length counts of the first Huffman table
    # more codes than 16-bit codes allow: only a decode sees it
    data[counts:counts + 16] = b"\xff" * 16
    assert parse_jpeg_header(bytes(data)).storable
    with pytest.raises(ImageDecodeError):
        prepare_for_storage(bytes(data))
    with pytest.raises(ImageDecodeError):
        prepare_for_storage(b"not an image at all")


@pytest.mark.parametrize("name",
                         ["train/n00000003/n00000003_4.JPEG", ODD_FILES["png"], ODD_FILES["grey"]])
def test_resize_sets_the_shorter_side(photo_tree, name):
    stored, kept = prepare_for_storage(read(os.path.join(photo_tree, name)), shorter_side=40)
    image = decode_rgb(stored)
    assert min(image.shape[:2]) == 40 and image.shape[2] == 3
    with Image.open(os.path.join(photo_tree, name)) as original:
        width, height = original.size
    assert image.shape[1] / image.shape[0] == pytest.approx(width / height, rel=0.05)


def test_resize_keeps_a_file_already_that_size(photo_tree):
    data = read(os.path.join(photo_tree, "train", "n00000000", "n00000000_1.JPEG"))
    header = parse_jpeg_header(data)
    stored, kept = prepare_for_storage(data, shorter_side=min(header.height, header.width))
    assert kept and stored == data


def test_resize_shorter_side_upscales_too():
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    assert resize_shorter_side(image, 20).shape == (20, 60, 3)
    assert resize_shorter_side(image, 5).shape == (5, 15, 3)


def test_decode_rgb_reads_grey_and_png_as_rgb(photo_tree):
    for name in ("grey", "png"):
        image = decode_rgb(read(os.path.join(photo_tree, ODD_FILES[name])))
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        expected = pil_rgb(read(os.path.join(photo_tree, ODD_FILES[name])))
        assert np.abs(image.astype(np.int16) - expected).max() <= 2
