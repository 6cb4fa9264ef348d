"""The LMDB dataset: both the original tool's LMDBs and ours, missing keys, and use across
processes."""

from __future__ import annotations

import os

import cv2
import lmdb
import msgpack
import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader

from dataset import lmdb_dataset
from dataset.image_io import ImageDecodeError, decode_rgb
from dataset.image_list import read_list
from dataset.img2lmdb import pack_split
from dataset.lmdb_dataset import ImageFolder, open_lmdb_readonly
from dataset.lmdb_format import encode_record
from dataset.mk_img_list import make_lists
from tests.conftest import ODD_FILES
from utils.errors import DataError, UserError


@pytest.fixture(scope="module")
def packed_val(photo_tree, tmp_path_factory) -> tuple[str, str]:
    """(LMDB folder, list file) of the photo tree's val split, packed by our tool."""
    out = str(tmp_path_factory.mktemp("packed"))
    make_lists(photo_tree, out)
    pack_split(photo_tree, out, out, "val", workers=1, progress=False)
    return os.path.join(out, "val"), os.path.join(out, "val_list.txt")


def write_original_lmdb(photo_tree: str, root: str, lines: list[str], labels: list[int]) -> None:
    """An LMDB exactly as the original tool wrote it: OpenCV-re-encoded JPEG + 2-byte
    little-endian label, msgpacked."""
    env = lmdb.open(root, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for line, label in zip(lines, labels):
            ok, jpeg = cv2.imencode(".jpg", cv2.imread(os.path.join(photo_tree, "train", line)))
            assert ok
            txn.put(line.encode("ascii"),
                    msgpack.packb(jpeg.tobytes() + label.to_bytes(2, "little"), use_bin_type=True))
    env.close()


def test_reads_an_lmdb_written_by_the_original_tool(photo_tree, tmp_path):
    lines = ["n00000002/n00000002_0.JPEG", "n00000000/n00000000_3.JPEG",
             "n00000003/n00000003_5.JPEG"]
    labels = [2, 0, 999]  # any 16-bit class index survives
    root = str(tmp_path / "train")
    write_original_lmdb(photo_tree, root, lines, labels)
    list_file = tmp_path / "train_datalist"
    list_file.write_text("".join(line + "\n" for line in lines))

    ds = ImageFolder(root, str(list_file))
    assert len(ds) == 3
    for index, (line, label) in enumerate(zip(lines, labels)):
        sample, target = ds[index]
        assert isinstance(target, int) and target == label
        jpeg = cv2.imencode(".jpg", cv2.imread(os.path.join(photo_tree, "train", line)))[1]
        expected = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(sample, expected)


def test_reads_our_lmdb_with_transforms(packed_val, photo_tree):
    root, list_file = packed_val
    seen = []
    ds = ImageFolder(root, list_file,
                     transform=lambda image: seen.append(image.shape) or image.mean(),
                     target_transform=lambda target: target + 100)
    lines = read_list(list_file)
    assert len(ds) == len(lines) and ds.name(0) == lines[0]
    for index, line in enumerate(lines):
        mean, target = ds[index]
        assert target == int(line[1:9]) + 100
        assert 0 < mean < 255
    # the greyscale JPEG comes out RGB
    assert all(len(shape) == 3 and shape[2] == 3 for shape in seen)
    grey = ODD_FILES["grey_val"].removeprefix("val/")
    assert grey in lines


def test_names_are_a_compact_array(packed_val):
    ds = ImageFolder(*packed_val)
    assert isinstance(ds.names, np.ndarray) and ds.names.dtype.kind == "S"


def test_decode_false_gives_the_stored_bytes(packed_val, photo_tree):
    ds = ImageFolder(*packed_val, decode=False)
    data, _ = ds[1]
    with open(os.path.join(photo_tree, "val", ds.name(1)), "rb") as f:
        assert data == f.read()


def test_missing_key_error_names_the_key(packed_val, tmp_path):
    root, list_file = packed_val
    lines = read_list(list_file)
    longer = tmp_path / "val_list.txt"
    longer.write_text("".join(line + "\n" for line in [lines[0], "n00000001/not_packed.JPEG"]))
    ds = ImageFolder(root, str(longer))
    ds[0]
    with pytest.raises(DataError, match="n00000001/not_packed.JPEG") as info:
        ds[1]
    assert isinstance(info.value, UserError)
    assert "key 'n00000001/not_packed.JPEG'" in str(info.value)


def test_a_damaged_record_names_its_key_and_lmdb(packed_val, tmp_path):
    root, list_file = packed_val
    good = read_list(list_file)[0]
    with open_lmdb_readonly(root).begin() as txn:
        good_value = txn.get(good.encode())
    damaged_root = str(tmp_path / "damaged")
    records = {good: good_value,
               "n00000001/cut_short.JPEG": encode_record(b"\xff\xd8\xff\xe0 not a JPEG", 1),
               "n00000002/not_a_record.JPEG": b"\x01\x02"}
    env = lmdb.open(damaged_root, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key.encode(), value)
    env.close()
    damaged_list = tmp_path / "damaged_list.txt"
    damaged_list.write_text("".join(key + "\n" for key in records))

    decoding = ImageFolder(damaged_root, str(damaged_list))
    bytes_to_transform = ImageFolder(damaged_root, str(damaged_list), transform=decode_rgb,
                                     decode=False)
    for ds in (decoding, bytes_to_transform):
        assert ds[0][0].ndim == 3
        # the type survives, so callers catch what they did
        with pytest.raises(ImageDecodeError) as info:
            ds[1]
        message = str(info.value)
        assert message.startswith("image 'n00000001/cut_short.JPEG' "
                                  f"in the LMDB at '{damaged_root}': ")
        assert "cannot decode image" in message and "\n" not in message
        with pytest.raises(DataError,
                           match=r"^image 'n00000002/not_a_record.JPEG' in the LMDB at .*: "):
            ds[2]


def test_opens_lazily(packed_val, tmp_path):
    ds = ImageFolder(str(tmp_path / "not_built_yet"), packed_val[1])  # construction touches no LMDB
    with pytest.raises(DataError, match="img2lmdb"):
        ds[0]
    with pytest.raises(DataError, match="mk_img_list"):
        ImageFolder(packed_val[0], str(tmp_path / "no_list.txt"))


def test_root_resolved_once_and_every_spelling_shares_one_handle(packed_val, tmp_path, monkeypatch):
    root, list_file = packed_val
    link = tmp_path / "link_to_val"
    link.symlink_to(root, target_is_directory=True)
    spellings = [root, str(link), os.path.join(root, "..", os.path.basename(root))]
    datasets = [ImageFolder(spelling, list_file) for spelling in spellings]
    resolved = []
    real_realpath = os.path.realpath
    monkeypatch.setattr(lmdb_dataset.os.path, "realpath",
                        lambda path: resolved.append(path) or real_realpath(path))
    samples = [[ds[i] for i in range(len(ds))] for ds in datasets]
    assert resolved == []  # reads use the root resolved at construction
    for other in samples[1:]:
        for (sample, target), (want_sample, want_target) in zip(other, samples[0]):
            assert target == want_target
            np.testing.assert_array_equal(sample, want_sample)
    handles = {id(open_lmdb_readonly(spelling)) for spelling in spellings}
    assert len(handles) == 1


def all_items(loader: DataLoader) -> list[tuple[np.ndarray, int]]:
    return [(sample.numpy() if isinstance(sample, torch.Tensor) else sample, int(target))
            for sample, target in loader]


@pytest.mark.parametrize("context, workers", [("fork", 2), ("spawn", 1)])
def test_dataloader_workers_and_two_datasets_on_one_lmdb(packed_val, context, workers):
    first, second = ImageFolder(*packed_val), ImageFolder(*packed_val)
    # the main process opens the LMDB before workers start
    expected = [first[i] for i in range(len(first))]
    assert second[0][1] == expected[0][1]  # a second dataset on the same LMDB in this process
    both = ConcatDataset([first, second])  # each worker reads through both datasets too
    loader = DataLoader(both, batch_size=None, shuffle=False, num_workers=workers,
                        multiprocessing_context=context)
    items = all_items(loader)
    assert len(items) == 2 * len(expected)
    for (sample, target), (want_sample, want_target) in zip(items, expected + expected):
        assert target == want_target
        np.testing.assert_array_equal(sample, want_sample)
