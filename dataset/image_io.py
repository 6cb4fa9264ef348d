"""Decoding image files, and choosing what the packer stores: ImageNet's RGB and greyscale JPEGs
byte for byte (re-encoding is lossy and slow), anything else (a PNG named .JPEG, CMYK) converted
once to an RGB JPEG that every decoder reads the same way.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import DataError

DEFAULT_JPEG_QUALITY = 95  # what the original packer's cv2.imencode used

# Start-of-frame markers whose frames libjpeg, libjpeg-turbo and PIL all decode: baseline,
# extended sequential and progressive Huffman. Lossless (C3) and arithmetic-coded (C9..CF)
# frames are legal but unsupported by many builds, so they are converted.
_STORABLE_SOF = (0xC0, 0xC1, 0xC2)
_ALL_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 DHT, C8 reserved, CC DAC
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length field
_SOI, _EOI, _SOS, _APP14 = 0xD8, 0xD9, 0xDA, 0xEE

# OpenCV applies the EXIF orientation unless told not to; torchvision's PIL loader (which the
# official teachers were trained with) does not, so neither do we.
CV_COLOR_AT_SCALE = {scale: flag | cv2.IMREAD_IGNORE_ORIENTATION for scale, flag in (
    (1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
    (8, cv2.IMREAD_REDUCED_COLOR_8))}
_CV_CHECK = cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_IGNORE_ORIENTATION


class ImageDecodeError(DataError):
    """Bytes that are not a readable image; the message says why in a few words."""


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's markers say, read without decoding any pixels."""

    frame_marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    precision: int
    height: int
    width: int
    components: int
    adobe_transform: int | None  # APP14 colour transform: 0 none, 1 YCbCr, 2 YCCK
    has_end: bool  # an end-of-image marker follows the first scan: the file is not cut short

    @property
    def storable(self) -> bool:
        """An 8-bit Huffman greyscale or colour JPEG every decoder reads alike (not CMYK/YCCK)."""
        return (self.frame_marker in _STORABLE_SOF and self.precision == 8 and self.height > 0
                and self.width > 0 and self.components in (1, 3) and self.adobe_transform != 2)


def parse_jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG file; None unless it is well-formed up to its first scan."""
    if data[:2] != b"\xff\xd8":
        return None
    frame: tuple[int, int, int, int, int] | None = None
    adobe_transform: int | None = None
    pos, size = 2, len(data)
    while pos < size:
        if data[pos] != 0xFF:
            return None
        while pos < size and data[pos] == 0xFF:  # fill bytes may pad any marker
            pos += 1
        if pos >= size:
            return None
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (_SOI, _EOI) or pos + 2 > size:
            return None
        (length,) = struct.unpack_from(">H", data, pos)
        segment = data[pos + 2:pos + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == _SOS:
            if frame is None:
                return None
            has_end = data.rfind(b"\xff\xd9", pos + length) >= 0
            return JpegHeader(*frame, adobe_transform=adobe_transform, has_end=has_end)
        if marker in _ALL_SOF and len(segment) >= 6:
            precision, height, width, components = struct.unpack_from(">BHHB", segment)
            frame = (marker, precision, height, width, components)
        elif marker == _APP14 and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]
        pos += length
    return None


def imdecode(data: bytes, flags: int = CV_COLOR_AT_SCALE[1]) -> np.ndarray | None:
    """OpenCV's decode of the bytes of an image file (BGR), or None where it cannot read them."""
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags) if data else None


def decode_rgb(data: bytes) -> np.ndarray:
    """An H x W x 3 uint8 RGB array from the bytes of an image file: OpenCV's decode, else
    PIL's; ImageDecodeError when neither reads them."""
    image = imdecode(data)
    if image is not None:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(io.BytesIO(data)) as pil:
            return np.asarray(pil.convert("RGB"))
    except Exception as exc:  # PIL raises many types for bad files
        raise ImageDecodeError(f"cannot decode image ({exc.__class__.__name__}: {exc})") from None


def _decode_bgr_any(data: bytes) -> np.ndarray:
    """A BGR array from any file PIL or OpenCV reads. PIL goes first: it converts CMYK/YCCK
    (Adobe's inverted channels too) and palettes, and raises on truncated files where libjpeg
    builds may only warn."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()
            rgb = np.asarray(pil.convert("RGB"))
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    except UnidentifiedImageError:
        pass
    except Exception as exc:  # PIL raises many types for a damaged file
        raise ImageDecodeError(f"damaged image ({exc.__class__.__name__}: {exc})") from None
    image = imdecode(data)
    if image is None:
        raise ImageDecodeError("not an image file PIL or OpenCV can read")
    return image


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Scale image so that its shorter side is size pixels, keeping the aspect ratio."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size == (width, height):
        return image
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, new_size, interpolation=interpolation)


def prepare_for_storage(data: bytes, shorter_side: int | None = None,
                        quality: int = DEFAULT_JPEG_QUALITY) -> tuple[bytes, bool]:
    """The JPEG bytes to store for an image file, and whether they are the file itself: a
    storable JPEG already of shorter_side (or any, without it) that decodes is kept; anything
    else is decoded, scaled and re-encoded. ImageDecodeError for truncated or unreadable data."""
    try:
        header = parse_jpeg_header(data)
        if header is None or not header.storable:
            image = _decode_bgr_any(data)
        else:
            # Some libjpeg builds only warn about a file cut short and return grey rows for it.
            if not header.has_end:
                raise ImageDecodeError("truncated JPEG (no end-of-image marker)")
            shorter = min(header.height, header.width)
            keep = shorter_side is None or shorter == shorter_side
            # A kept file still gets the cheapest real decode, 1/8 scale luminance: libjpeg
            # entropy-decodes every block of every component, so it sees damage anywhere. One
            # to convert is decoded at the smallest DCT scale that leaves shorter_side.
            scale = 1 if keep else next((s for s in (8, 4, 2) if shorter // s >= shorter_side), 1)
            image = imdecode(data, _CV_CHECK if keep else CV_COLOR_AT_SCALE[scale])
            if image is None:
                raise ImageDecodeError("damaged JPEG data")
            if keep:
                return data, True
        if shorter_side is not None:
            image = resize_shorter_side(image, shorter_side)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise ImageDecodeError("OpenCV could not encode the image as JPEG")
        return buf.tobytes(), False
    except cv2.error as exc:  # e.g. an image beyond OpenCV's pixel limit
        raise ImageDecodeError(f"OpenCV failed: {str(exc).strip().splitlines()[-1]}") from None
