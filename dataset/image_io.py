"""Decoding image files (JPEG, PNG, greyscale, CMYK) to RGB uint8 arrays."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image


def decode_rgb(data: bytes) -> np.ndarray:
    """An H x W x 3 uint8 RGB array from the bytes of an image file.

    OpenCV (libjpeg-turbo) reads nearly everything; PIL is the fallback for the rest. Raises
    ValueError when neither can read the bytes.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is not None:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(io.BytesIO(data)) as pil:
            return np.asarray(pil.convert("RGB"))
    except Exception as exc:  # PIL raises many types for bad files
        raise ValueError(f"cannot decode image ({exc.__class__.__name__}: {exc})") from None
