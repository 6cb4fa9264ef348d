"""libjpeg-turbo region decoding (dataset.jpeg_region) against OpenCV's whole-image decode, on
real photographs: the transforms may use either decoder, so they must give the same pixels."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dataset import jpeg_region
from dataset.demo_data import sample_photos
from dataset.jpeg_region import SOURCE, RegionDecodeError, RegionDecoder
from tests.conftest import REQUIRE_REGION_DECODER, require_region_decoder

REPO = Path(__file__).resolve().parents[1]
CV_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **{"quality": 90, **options})
    return buffer.getvalue()


def opencv_rgb(data: bytes, scale: int = 1) -> np.ndarray:
    """The reference: OpenCV's decode of the whole image at 1/scale, as RGB."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), CV_FLAGS[scale])
    assert image is not None
    return image[:, :, ::-1]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def regions(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) regions of a width x height image: corners, every edge, the whole
    image, single pixels and rows, x and y on an iMCU boundary at every scale and off it."""
    aligned = 16 * (width // 48)
    odd_x, odd_y = width // 3 | 1, height // 3 | 1
    return [
        (0, 0, width // 3, height // 4),  # top-left corner
        (width - width // 3, height - height // 5, width // 3, height // 5),  # bottom-right
        (0, 0, width, height),  # the whole image
        (aligned, height // 3, width // 3, height // 3),  # block-aligned x
        (odd_x, odd_y, width // 4 + 3, height // 4),  # unaligned x and y
        (width - 1, height - 1, 1, 1),  # the last pixel
        (1, height // 2, width - 2, 1),  # one row, one column short of each side
        (width // 2 | 1, 0, width - (width // 2 | 1), 2),  # top edge to right edge
        (0, height - 3, 5, 3),  # bottom-left corner
    ]


def check_regions(decoder: RegionDecoder, data: bytes, scale: int) -> None:
    """Every region of regions(), asked for with one column more on each side where the image
    has one (as transforms.decode_window does), against OpenCV on the columns asked for."""
    whole = opencv_rgb(data, scale)
    height, width = whole.shape[:2]
    for x, y, w, h in regions(width, height):
        x0, x1 = max(0, x - 1), min(width, x + w + 1)
        image, first = decoder.decode(data, x0, y, x1 - x0, h, scale)
        where = f"region {(x, y, w, h)} at 1/{scale}"
        assert image.dtype == np.uint8 and image.shape == (h, x1 - first, 3), where
        # The first column is a block boundary at or before x0, less than one iMCU (at most
        # 16 full-size columns, 2x subsampled) before it.
        assert 0 <= first <= x0 and x0 - first < 16 // scale, where
        assert first % (8 // scale) == 0, where
        inner = image[:, x - first:x - first + w]
        assert max_diff(inner, whole[y:y + h, x:x + w]) == 0, where


@pytest.fixture()
def decoder() -> RegionDecoder:
    """This process's decoder now (tests below clear the per-process cache, which replaces it)."""
    return require_region_decoder()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """The two photographs (640 x 427, 4:2:0), and a crop whose sides are no multiple of the
    16-pixel iMCU, so the last block row and column are partial at every scale."""
    china, flower = sample_photos()
    return {
        "china": jpeg_bytes(Image.fromarray(china)),
        "flower": jpeg_bytes(Image.fromarray(flower), quality=80),
        "odd_size": jpeg_bytes(Image.fromarray(china[5:418, 3:630])),  # 627 x 413
    }


@pytest.fixture(scope="module")
def china(photos) -> bytes:
    return photos["china"]


# ---------------------------------------------------------------------------------------------
# Pixels.


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["china", "flower", "odd_size"])
def test_regions_match_opencv_whole_decode(decoder, photos, name, scale):
    check_regions(decoder, photos[name], scale)


@pytest.mark.parametrize("encoding", ["grey", "progressive", "444", "422", "420"])
def test_encodings_match_opencv(decoder, encoding):
    """Greyscale comes back as RGB; progressive scans and every chroma subsampling are cropped
    and skipped correctly."""
    photo = Image.fromarray(sample_photos()[1][20:360, 30:590])
    data = {
        "grey": lambda: jpeg_bytes(photo.convert("L")),
        "progressive": lambda: jpeg_bytes(photo, progressive=True),
        "444": lambda: jpeg_bytes(photo, subsampling=0),
        "422": lambda: jpeg_bytes(photo, subsampling=1),
        "420": lambda: jpeg_bytes(photo, subsampling=2),
    }[encoding]()
    for scale in jpeg_region.SCALES:
        check_regions(decoder, data, scale)
    if encoding == "grey":
        image, _ = decoder.decode(data, 100, 50, 200, 100)
        assert (image == image[:, :, :1]).all()
        assert image.std() > 10  # a photograph, not a flat fill


def test_warnings_are_neither_errors_nor_printed(decoder, china, capfd):
    """Extraneous bytes before a marker (common in ImageNet) are a libjpeg warning: the image
    decodes as OpenCV decodes it, and nothing reaches the process's stderr."""
    end_of_app0 = 4 + int.from_bytes(china[4:6], "big")
    data = china[:end_of_app0] + b"\x00\x11\x22" + china[end_of_app0:]
    whole = opencv_rgb(data)
    capfd.readouterr()  # OpenCV may print its own warning
    image, first = decoder.decode(data, 99, 40, 302, 200)
    assert max_diff(image[:, 100 - first:400 - first], whole[40:240, 100:400]) == 0
    assert capfd.readouterr() == ("", "")


# ---------------------------------------------------------------------------------------------
# Errors.


def huffman_counts_overwritten(data: bytes) -> bytes:
    """The first DHT segment's 16 code counts set to 0xFF: more codes than any table can hold."""
    dht = data.index(b"\xff\xc4")
    damaged = bytearray(data)
    damaged[dht + 5:dht + 21] = b"\xff" * 16
    return bytes(damaged)


@pytest.mark.parametrize("damage", ["garbage", "empty", "huffman", "headers only"])
def test_damaged_data_raises_region_decode_error(decoder, china, damage):
    """libjpeg's errors come back as an exception with its message, not a longjmp or an exit;
    the decoder still works afterwards."""
    data = {"garbage": b"not a JPEG at all " * 20, "empty": b"",
            "huffman": huffman_counts_overwritten(china), "headers only": china[:300]}[damage]
    with pytest.raises(RegionDecodeError) as excinfo:
        decoder.decode(data, 0, 0, 16, 16)
    assert isinstance(excinfo.value, ValueError) and str(excinfo.value).strip()
    if damage == "huffman":
        assert "Huffman" in str(excinfo.value)
    image, first = decoder.decode(china, 0, 0, 33, 16)
    assert first == 0 and max_diff(image[:, :32], opencv_rgb(china)[:16, :32]) == 0


def test_truncated_file_is_an_error_not_grey_rows(decoder, china):
    """libjpeg only warns when the data ends early and fills the rest with grey; OpenCV and PIL
    refuse such a file, and so does the region decoder once it reaches the cut. Rows that lie
    wholly before the cut are real pixels (the transforms never ask: they check for the end
    marker first)."""
    cut = china[:len(china) // 2]
    with pytest.raises(RegionDecodeError, match="Premature end"):
        decoder.decode(cut, 0, 0, 100, 400)
    image, first = decoder.decode(cut, 0, 0, 101, 16)
    assert max_diff(image[:, :100], opencv_rgb(china)[:16, :100]) == 0


def test_any_bytes_like_input(decoder, china):
    expected, first = decoder.decode(china, 40, 30, 100, 50)
    for data in (bytearray(china), memoryview(china)):
        image, first_again = decoder.decode(data, 40, 30, 100, 50)
        assert first_again == first and np.array_equal(image, expected)


def test_cmyk_is_refused(decoder):
    """Only greyscale and colour JPEGs are region-decoded; CMYK falls back to whole-image
    decoders."""
    data = jpeg_bytes(Image.fromarray(sample_photos()[0][:64, :64]).convert("CMYK"))
    with pytest.raises(RegionDecodeError, match="greyscale"):
        decoder.decode(data, 0, 0, 16, 16)


@pytest.mark.parametrize("x,y,width,height,scale", [
    (600, 0, 41, 10, 1),  # one column past the right edge
    (0, 400, 10, 28, 1),  # one row past the bottom
    (300, 200, 21, 14, 2),  # fits at full size, not at 1/2 (320 x 214)
    (0, 0, 81, 1, 8),  # one column wider than the 80 x 54 image at 1/8
])
def test_region_outside_image_names_region(decoder, china, x, y, width, height, scale):
    """A region that does not fit is the caller's mistake, not damaged data: a plain ValueError
    (which the transforms' fallback on RegionDecodeError does not swallow) naming the region."""
    with pytest.raises(ValueError) as excinfo:
        decoder.decode(china, x, y, width, height, scale)
    assert type(excinfo.value) is ValueError
    message = str(excinfo.value)
    assert f"x={x} y={y} {width}x{height}" in message and f"1/{scale}" in message
    full_width, full_height = -(-640 // scale), -(-427 // scale)
    assert f"{full_width}x{full_height}" in message


@pytest.mark.parametrize("x,y,width,height,scale,words", [
    (-1, 0, 10, 10, 1, "x=-1"),
    (0, -3, 10, 10, 1, "y=-3"),
    (0, 0, 0, 10, 1, "0x10"),
    (0, 0, 10, 0, 1, "10x0"),
    (0, 0, 10, 10, 3, "scale"),
    (0, 0, 10, 10, 16, "scale"),
    (10**6, 0, 10, 10**4, 1, "outside any JPEG"),  # refused before a buffer for it is allocated
])
def test_invalid_arguments_raise_value_error(decoder, china, x, y, width, height, scale, words):
    with pytest.raises(ValueError, match=re.escape(words)) as excinfo:
        decoder.decode(china, x, y, width, height, scale)
    assert not isinstance(excinfo.value, RegionDecodeError)


# ---------------------------------------------------------------------------------------------
# Building and loading.


@pytest.mark.region_decoder
def test_build_compiles_once_per_source_text(tmp_path):
    """A second call reuses the library; a changed source gets its own; no temporary is left."""
    directory = tmp_path / "cache"
    path = jpeg_region.build(SOURCE, directory)
    assert path.is_file() and path.parent == directory
    assert re.fullmatch(r"jpeg_region-[0-9a-f]{16}\.so", path.name)
    mtime = path.stat().st_mtime_ns
    again = jpeg_region.build(SOURCE, directory)
    assert again == path and again.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(directory)) == [path.name]
    jpeg_region.self_check(RegionDecoder(str(path)))

    changed = tmp_path / "jpeg_region.c"
    changed.write_bytes(SOURCE.read_bytes() + b"\n/* changed */\n")
    other = jpeg_region.build(changed, directory)
    assert other != path and other.is_file()
    assert sorted(os.listdir(directory)) == sorted([path.name, other.name])


@pytest.mark.region_decoder
def test_build_failure_names_file_and_compiler_line(tmp_path):
    """A source that does not compile: the message names it and quotes the compiler's error
    line (not the 'In function' line before it), and no partial library is left."""
    source = tmp_path / "broken_source.c"
    source.write_text("int wsld_broken(void) {\n    return undeclared_identifier;\n}\n")
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    own = subprocess.run([compiler, "-fsyntax-only", str(source)], capture_output=True, text=True)
    error_line = next(line.strip() for line in own.stderr.splitlines() if "error" in line)
    directory = tmp_path / "out"
    with pytest.raises(RuntimeError) as excinfo:
        jpeg_region.build(source, directory)
    message = str(excinfo.value)
    assert "broken_source.c" in message and error_line in message
    assert "undeclared_identifier" in message
    assert list(directory.iterdir()) == []


@pytest.mark.region_decoder
def test_build_without_compiler(tmp_path, monkeypatch):
    """No compiler on PATH: a RuntimeError that says so, unless the library is already built."""
    built = tmp_path / "built"
    path = jpeg_region.build(SOURCE, built)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="no C compiler"):
        jpeg_region.build(SOURCE, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
    assert jpeg_region.build(SOURCE, built) == path


def test_linker_errors_are_quoted_by_the_line_that_names_the_problem():
    stderr = ("/usr/bin/ld: cannot find -ljpeg: No such file or directory\n"
              "collect2: error: ld returned 1 exit status\n")
    assert jpeg_region._error_line(stderr) == ("/usr/bin/ld: cannot find -ljpeg: "
                                               "No such file or directory")
    assert jpeg_region._error_line("") == "no output"


@pytest.mark.region_decoder
def test_rebuild_replaces_the_library(tmp_path):
    path = jpeg_region.build(SOURCE, tmp_path)
    inode = path.stat().st_ino
    assert jpeg_region.build(SOURCE, tmp_path, rebuild=True) == path
    assert path.stat().st_ino != inode  # a new file renamed into place, not rewritten in place
    jpeg_region.self_check(RegionDecoder(str(path)))


@pytest.mark.region_decoder
def test_a_cached_library_that_does_not_load_is_rebuilt(tmp_path, monkeypatch):
    """A home directory shared by machines with different libjpegs: the library another machine
    built does not load here, so it is built again rather than given up on."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    foreign = jpeg_region.build()
    foreign.write_bytes(b"\x7fELF built for another machine")
    jpeg_region._load.cache_clear()
    try:
        decoder = jpeg_region.region_decoder()
        assert decoder is not None and decoder.path == str(foreign)
        assert foreign.read_bytes()[:4] == b"\x7fELF" and foreign.stat().st_size > 1000
    finally:
        monkeypatch.undo()
        jpeg_region._load.cache_clear()


@pytest.mark.region_decoder
def test_cache_dir_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jpeg_region.cache_dir() == tmp_path / "xdg" / "wsld"
    path = jpeg_region.build()  # the default directory
    assert path.parent == tmp_path / "xdg" / "wsld" and path.is_file()
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # set but empty: the default, as the spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert jpeg_region.cache_dir() == tmp_path / "home" / ".cache" / "wsld"


def test_describe_and_cached_decoder(decoder):
    """The normal path: the decoder is built once per process and logs name the library."""
    assert jpeg_region.region_decoder() is decoder is jpeg_region.region_decoder()
    assert re.fullmatch(r"[1-9]\d*\.\d+\.\d+", decoder.version)
    line = jpeg_region.describe()
    assert line.startswith("libjpeg-turbo") and decoder.version in line
    assert Path(decoder.path).is_file()


@pytest.fixture()
def broken_load(request, monkeypatch):
    """jpeg_region.<name> replaced by one that raises, with the per-process cache cleared before
    and after, so that the real decoder is back for other tests whatever happens."""
    name, error = request.param
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise error

    jpeg_region._load.cache_clear()
    try:
        monkeypatch.setattr(jpeg_region, name, failing)
        yield calls
    finally:
        monkeypatch.undo()
        jpeg_region._load.cache_clear()


@pytest.mark.parametrize("broken_load,reason", [
    pytest.param(("build", RuntimeError("no C compiler (cc or gcc) on PATH")),
                 "no C compiler (cc or gcc) on PATH", id="no-compiler"),
    pytest.param(("self_check", RuntimeError("region decoding disagrees with OpenCV at scale 1/2")),
                 "region decoding disagrees with OpenCV at scale 1/2", id="self-check",
                 marks=pytest.mark.region_decoder),  # the build must succeed for the check to run
    pytest.param(("build", OSError("libjpeg.so.8: cannot open shared object file\nmore detail")),
                 "libjpeg.so.8: cannot open shared object file", id="multi-line"),
], indirect=["broken_load"])
def test_describe_gives_reason_without_decoder(broken_load, reason):
    """Without a decoder the transforms decode whole images with OpenCV; the log line says why
    (its first line only), and the failure is not retried on every call."""
    assert jpeg_region.region_decoder() is None
    line = jpeg_region.describe()
    assert line.startswith("OpenCV") and line.endswith(f"unavailable: {reason})")
    assert "more detail" not in line
    assert jpeg_region.region_decoder() is None
    assert len(broken_load) == 1


def test_self_check_catches_wrong_pixels(decoder):
    """A library that loads but decodes wrongly (headers of one libjpeg, another at run time)
    is caught before training, not after."""

    class Inverted:
        def decode(self, *args, **kwargs):
            image, first = decoder.decode(*args, **kwargs)
            return 255 - image, first

    jpeg_region.self_check(decoder)  # the real one passes
    with pytest.raises(RuntimeError, match="disagrees"):
        jpeg_region.self_check(Inverted())


# ---------------------------------------------------------------------------------------------
# Processes.

BUILD_IN_CHILD = """
import sys
from pathlib import Path
from dataset import jpeg_region
print("ready", flush=True)
sys.stdin.readline()  # both children build as soon as both are ready
path = jpeg_region.build(jpeg_region.SOURCE, Path(sys.argv[1]))
jpeg_region.self_check(jpeg_region.RegionDecoder(str(path)))  # loads and decodes
print(path, flush=True)
"""


@pytest.mark.region_decoder
def test_concurrent_builds_share_one_library(tmp_path, china):
    """Two processes building into the same fresh directory at once (DataLoader workers or
    ranks of one job) both get a whole, working library, and one file remains."""
    directory = tmp_path / "shared"
    children = [subprocess.Popen([sys.executable, "-c", BUILD_IN_CHILD, str(directory)], cwd=REPO,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline() == "ready\n"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    for child, (_, err) in zip(children, outputs):
        assert child.returncode == 0, err
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert path.parent == directory and os.listdir(directory) == [path.name]
    image, first = RegionDecoder(str(path)).decode(china, 199, 100, 102, 50)
    assert max_diff(image[:, 200 - first:300 - first], opencv_rgb(china)[100:150, 200:300]) == 0


class RegionDataset(torch.utils.data.Dataset):
    """Regions of one JPEG, decoded with this process's region decoder."""

    def __init__(self, data: bytes, boxes: list[tuple[int, int, int, int, int]]) -> None:
        self.data, self.boxes = data, boxes

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int):
        decoder = jpeg_region.region_decoder()
        image, first = decoder.decode(self.data, *self.boxes[index])
        return image, first, os.getpid(), id(decoder)


def test_decoder_works_in_forked_dataloader_workers(decoder, photos):
    """Workers started by fork inherit the loaded library (no rebuild, no reload) and decode
    exactly as the main process does."""
    data = photos["odd_size"]
    boxes = [(0, 0, 64, 32, 1), (101, 37, 300, 200, 1), (50, 20, 100, 80, 2),
             (9, 9, 40, 30, 4), (0, 0, 79, 52, 8), (300, 400, 327, 13, 1)]
    dataset = RegionDataset(data, boxes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    results = list(loader)
    assert len(results) == len(boxes)
    for index, (image, first, pid, decoder_id) in enumerate(results):
        expected, expected_first = decoder.decode(data, *boxes[index])
        assert first == expected_first
        assert np.array_equal(image.numpy(), expected)
        assert pid != os.getpid() and decoder_id == id(decoder)
    assert len({pid for _, _, pid, _ in results}) == 2


# ---------------------------------------------------------------------------------------------
# Tests on a machine without the decoder.


@pytest.mark.slow
def test_tests_needing_the_decoder_skip_without_it_and_fail_where_it_is_required(tmp_path):
    """A machine with no C compiler on PATH (and nothing built yet): a test that needs the region
    decoder is skipped with describe()'s reason, its whole-image twin runs, and under
    WSLD_REQUIRE_REGION_DECODER=1, as CI sets it, the skip becomes a failure."""
    (tmp_path / "bin").mkdir()
    env = {**os.environ, "PATH": str(tmp_path / "bin"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop(REQUIRE_REGION_DECODER, None)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               "tests/test_transforms.py::test_unscaled_crops_are_torchvision_to_within_rounding"]
    root = Path(__file__).resolve().parent.parent
    skipped = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    assert "1 passed, 1 skipped" in skipped.stdout, skipped.stdout
    assert "region decoding unavailable: no C compiler (cc or gcc) on PATH" in skipped.stdout

    required = subprocess.run(command, cwd=root, env={**env, REQUIRE_REGION_DECODER: "1"},
                              capture_output=True, text=True)
    assert required.returncode != 0
    assert "1 passed, 1 error" in required.stdout, required.stdout  # failed in setup
    assert f"{REQUIRE_REGION_DECODER}=1, but: OpenCV, whole images" in required.stdout
