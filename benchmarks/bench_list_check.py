"""What the start-up data check costs at ImageNet's scale: an LMDB of 1.28M keys and its list.

    python3 benchmarks/bench_list_check.py [--keys 1281167]

Builds, in a temporary folder, an LMDB whose keys are ImageNet-like list lines (values a few
bytes, so only the keys and the B-tree matter) and the list that names them, then times
``check_lmdb_whole`` and ``check_list_in_lmdb`` on it. The last line gives the seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import lmdb

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.checks import check_list_in_lmdb, check_lmdb_whole  # noqa: E402
from dataset.image_list import write_list  # noqa: E402

IMAGENET_TRAIN = 1281167
CLASSES = 1000


def build(folder: str, keys: int) -> tuple[str, str]:
    """An LMDB at folder/train with keys list lines like 'n01440764/n01440764_10026.JPEG'."""
    lines = sorted(f"n{c:08d}/n{c:08d}_{i}.JPEG" for i in range(keys) for c in [i % CLASSES])
    root = os.path.join(folder, "train")
    env = lmdb.open(root, map_size=1 << 30, sync=False)
    with env.begin(write=True) as txn:
        for line in lines:
            txn.put(line.encode("utf-8"), b"\x00\x01", append=True)
    env.close()
    list_path = os.path.join(folder, "train_list.txt")
    write_list(list_path, lines)
    return root, list_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=IMAGENET_TRAIN)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root, list_path = build(folder, args.keys)
        size = os.path.getsize(os.path.join(root, "data.mdb"))
        start = time.perf_counter()
        check_lmdb_whole(root)
        check_list_in_lmdb(list_path, root)
        seconds = time.perf_counter() - start
    print(f"load average {os.getloadavg()[0]:.1f}; {args.keys} keys, "
          f"data.mdb {size / 2**20:.0f} MiB")
    print(f"LMDB and list check at {args.keys} keys: {seconds:.2f} s")


if __name__ == "__main__":
    main()
