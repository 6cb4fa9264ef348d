"""Time dataset/img2lmdb.py packing from ImageNet's official archives against packing the same
images from extracted class folders.

Both run as whole processes (as users run them) on the same ImageNet-like JPEGs (crops of
scikit-learn's photos, 300..1000 px), into fresh LMDBs, each from its own list made by
mk_img_list.py; the best of --repeats runs counts, the two alternating. Both read from the page
cache, so this compares the work of the two routes, not the disks: on network storage the
archive's one sequential stream is where it gains most. Afterwards the two LMDBs must be equal
byte for byte.

    python benchmarks/bench_pack_archives.py [--num_images 3000] [--repeats 3]

The last line prints the ratio of the two speeds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmdb  # noqa: E402

from benchmarks.bench_pack import adopt_orphaned_descendants, timed  # noqa: E402
from dataset.demo_data import write_official_archives, write_photo_tree  # noqa: E402
from dataset.image_list import read_list  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 8


def lmdb_items(path: str) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return list(txn.cursor())
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts_all_cpu = adopt_orphaned_descendants()

    with tempfile.TemporaryDirectory() as root:
        folders, archives = os.path.join(root, "folders"), os.path.join(root, "archives")
        write_photo_tree(folders, {"train": -(-args.num_images // NUM_CLASSES), "val": 1},
                         num_classes=NUM_CLASSES,
                         side_range=(300, 1000))
        write_official_archives(folders, archives)
        for source in (folders, archives):
            subprocess.run([sys.executable, "dataset/mk_img_list.py", "--image_path", source,
                            "--output_path", source + "_lists"], check=True, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL)
        lines = read_list(os.path.join(folders + "_lists", "train_list.txt"))
        if read_list(os.path.join(archives + "_lists", "train_list.txt")) != lines:
            raise RuntimeError("the lists of the two routes differ")

        results: dict[str, list[tuple[float, float]]] = {folders: [], archives: []}
        for run in range(args.repeats):
            for source in (folders, archives):
                results[source].append(timed([sys.executable, "dataset/img2lmdb.py", "--image_path",
                                              source,
                                               "--list_path", source + "_lists", "--output_path",
                                               f"{source}_lmdb{run}", "--split", "train"]))
        from_folders = lmdb_items(os.path.join(folders + "_lmdb0", "train"))
        if from_folders != lmdb_items(os.path.join(archives + "_lmdb0", "train")):
            raise RuntimeError("the LMDBs packed from the archives and from the folders differ")

        folder_wall, folder_cpu = min(results[folders])
        archive_wall, archive_cpu = min(results[archives])
        num_images = len(lines)
        archive_mb = os.path.getsize(os.path.join(archives, "ILSVRC2012_img_train.tar")) / 1e6
        print(f"{num_images} images ({archive_mb:.0f} MB train tar), {os.cpu_count()} cores, best "
              f"of {args.repeats}; the two LMDBs are equal byte for byte")
        if not counts_all_cpu:
            print("note: not on Linux: the CPU time of img2lmdb.py's workers is not counted")
        print(f"from extracted folders: {folder_wall:.2f} s wall, {folder_cpu:.2f} s CPU "
              f"({num_images / folder_wall:.0f} img/s); from the official archives: "
              f"{archive_wall:.2f} s wall, {archive_cpu:.2f} s CPU "
              f"({num_images / archive_wall:.0f} img/s)")
        print(f"pack speed from archives / from folders: {folder_wall / archive_wall:.2f}x "
              f"wall-clock ({folder_cpu / archive_cpu:.2f}x CPU time; target >= 1.0)")


if __name__ == "__main__":
    main()
