"""The original WSLD LMDB record format, encoded and decoded in this one place: LMDBs built by
the original tool read unchanged. Key: the list line (``wnid/file.JPEG``); value:
``msgpack.packb(image_bytes + label.to_bytes(2, 'little'), use_bin_type=True)``.
"""

from __future__ import annotations

import msgpack

from utils.errors import DataError

LABEL_BYTES = 2
MAX_LABEL = (1 << (8 * LABEL_BYTES)) - 1


def encode_key(name: str) -> bytes:
    return name.encode("utf-8")


def encode_record(image_bytes: bytes, label: int) -> bytes:
    if not 0 <= label <= MAX_LABEL:
        raise ValueError(f"label {label} does not fit the format's unsigned 16-bit field")
    return msgpack.packb(bytes(image_bytes) + int(label).to_bytes(LABEL_BYTES, "little"),
                         use_bin_type=True)


def decode_record(value: bytes) -> tuple[bytes, int]:
    """Returns (image file bytes, label)."""
    try:
        payload = msgpack.unpackb(value, raw=False)
    except (ValueError, msgpack.UnpackException):  # msgpack's errors for bytes that are not msgpack
        payload = None
    if not isinstance(payload, (bytes, bytearray)) or len(payload) <= LABEL_BYTES:
        raise DataError("LMDB value is not a WSLD record (msgpack bytes: image + 2-byte label)")
    return bytes(payload[:-LABEL_BYTES]), int.from_bytes(payload[-LABEL_BYTES:], "little")
