"""Decoding only the rows and columns of a JPEG that a crop needs (about half a training image),
with libjpeg-turbo through ``csrc/jpeg_region.c``: neither OpenCV nor Pillow exposes it. Built on
first use against the system libjpeg-turbo (Debian and Ubuntu: ``apt install gcc
libjpeg-turbo8-dev``, or ``libjpeg62-turbo-dev``), cached in ``~/.cache/wsld``. Without it the
transforms decode whole images with OpenCV: the same pixels, more slowly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np

from dataset.image_io import CV_COLOR_AT_SCALE

SOURCE = Path(__file__).resolve().parent / "csrc" / "jpeg_region.c"
SCALES = (1, 2, 4, 8)
JPEG_MAX_SIDE = 65535
_MESSAGE_SIZE = 200
_BUILD_TIMEOUT_S = 120


class RegionDecodeError(ValueError):
    """The JPEG data could not be decoded; the message is libjpeg's."""


class RegionDecoder:
    """libjpeg-turbo's region decoding, through the library built from ``csrc/jpeg_region.c``."""

    def __init__(self, library_path: str) -> None:
        library = ctypes.CDLL(library_path)
        self.path = library_path
        self._decode = library.wsld_decode_region
        self._decode.restype = ctypes.c_int
        self._decode.argtypes = [
            ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
            ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int,
        ]
        number = library.wsld_libjpeg_turbo_version()  # of the headers it was built against
        self.version = f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"

    def decode(self, data: bytes | bytearray | memoryview, x: int, y: int, width: int, height: int,
               scale: int = 1) -> tuple[np.ndarray, int]:
        """Rows [y, y + height) and at least columns [x, x + width) of the image at 1/scale as
        an RGB array, and the image column its first column is (a block boundary at or before x).

        Chroma upsampling treats the first and last columns decoded as image edges: ask for one
        column more each side than you use, where there is one. The array views a buffer as
        wide as x + width: copy a small region you keep long.
        """
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, not {scale}")
        if min(x, y) < 0 or min(width, height) <= 0 or max(x + width, y + height) > JPEG_MAX_SIDE:
            raise ValueError(f"region x={x} y={y} {width}x{height} is empty or outside any JPEG")
        if not isinstance(data, bytes):
            data = bytes(data)  # ctypes passes bytes by pointer; other buffers need the copy
        # The columns decoded start at a block boundary at or after 0 and end at x + width.
        out = np.empty(height * (x + width) * 3, dtype=np.uint8)
        info = (ctypes.c_int * 4)()
        message = ctypes.create_string_buffer(_MESSAGE_SIZE)
        status = self._decode(data, len(data), scale, x, y, width, height, out.ctypes.data,
                              out.size, info, message, _MESSAGE_SIZE)
        if status == 1:
            raise RegionDecodeError(message.value.decode("utf-8", "replace") or "damaged JPEG data")
        if status != 0:
            raise ValueError(f"region x={x} y={y} {width}x{height} does not fit the "
                             f"{info[0]}x{info[1]} image at 1/{scale}")
        first_column, columns = info[2], info[3]
        return out[:height * columns * 3].reshape(height, columns, 3), first_column


def cache_dir() -> Path:
    """Where built libraries are kept, per user, as other build-on-first-use tools keep theirs."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsld"


def build(source: Path = SOURCE, directory: Path | None = None, rebuild: bool = False) -> Path:
    """The shared library compiled from source in directory, once per source text and processor
    architecture unless rebuild. Each build goes to its own temporary file, renamed into place,
    so processes building at once never see a half-written library."""
    directory = directory if directory is not None else cache_dir()
    key = source.read_bytes() + platform.machine().encode()
    target = directory / f"jpeg_region-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.is_file() and not rebuild:
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=directory, prefix=".building-", suffix=".so")
    os.close(fd)
    command = [compiler, "-O2", "-shared", "-fPIC", "-o", partial, str(source), "-ljpeg"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"building {source.name} failed: {_error_line(result.stderr)}")
        os.replace(partial, target)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"building {source.name} took over {_BUILD_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _error_line(stderr: str) -> str:
    """The compiler's or linker's error line (not collect2's summary of it), else the first."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = (line for line in lines
              if (": error:" in line or "cannot find" in line) and not line.startswith("collect2"))
    return next(errors, lines[0] if lines else "no output")


def self_check(decoder: RegionDecoder) -> None:
    """Raise RuntimeError unless a region off block boundaries of a JPEG made here decodes, at
    every scale, as in OpenCV's whole-image decode: a libjpeg that misbehaves, or one built
    against other headers, shows here, not in training."""
    noise = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    image = cv2.resize(noise, (320, 240), interpolation=cv2.INTER_CUBIC)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("OpenCV could not encode the self-check image")
    data = encoded.tobytes()
    for scale in SCALES:
        whole = cv2.imdecode(encoded, CV_COLOR_AT_SCALE[scale])[:, :, ::-1]
        height, width = whole.shape[:2]
        x, y, w, h = width // 4 + 3, height // 4 + 1, width // 2, height // 3
        region, first = decoder.decode(data, x - 1, y, w + 2, h, scale)
        if not np.array_equal(region[:, x - first:x - first + w], whole[y:y + h, x:x + w]):
            raise RuntimeError(f"region decoding disagrees with OpenCV at scale 1/{scale}")


@functools.cache
def _load() -> RegionDecoder | str:
    # Cached per process: building, loading and checking happen once, and DataLoader workers
    # started by fork inherit the result. A string is the reason there is no decoder.
    try:
        path = build()
        try:
            decoder = RegionDecoder(str(path))
        except OSError:  # built on another machine sharing this cache, against another libjpeg
            decoder = RegionDecoder(str(build(rebuild=True)))
        self_check(decoder)
    except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return decoder


def region_decoder() -> RegionDecoder | None:
    """This process's region decoder, built on first call; None where it cannot be had."""
    loaded = _load()
    return loaded if isinstance(loaded, RegionDecoder) else None


def describe() -> str:
    """One line for logs: which JPEG decoder the transforms use, and why not the faster one."""
    loaded = _load()
    if isinstance(loaded, RegionDecoder):
        return f"libjpeg-turbo {loaded.version}, decoding crops only"
    return f"OpenCV, whole images (region decoding unavailable: {loaded})"
