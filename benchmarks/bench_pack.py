"""Time dataset/img2lmdb.py against a packer that works the way the original did.

The original decoded every image with cv2.imread and re-encoded it with cv2.imencode, in one
process. Ours keeps RGB/greyscale JPEGs byte for byte after checking each one decodes (at 1/8
scale) and spreads the work over all cores. Both run as whole processes on the same tree of
ImageNet-like JPEGs (crops of scikit-learn's photos, 300..1000 px, quality 75..95), into fresh
LMDBs; the best of --repeats runs counts. Afterwards every stored image of both LMDBs is decoded.

    python benchmarks/bench_pack.py [--num_images 3000] [--repeats 3]

The last line prints the speed-up.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmdb  # noqa: E402

from dataset.demo_data import write_photo_tree  # noqa: E402
from dataset.image_io import decode_rgb  # noqa: E402
from dataset.image_list import read_list  # noqa: E402
from dataset.lmdb_format import decode_record, encode_key, encode_record  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 8
PR_SET_CHILD_SUBREAPER = 36  # Linux prctl option


def pack_like_original(image_path: str, list_file: str, lmdb_path: str) -> None:
    """One process: cv2.imread, cv2.imencode to JPEG, msgpack, commit every 1000 images."""
    import cv2

    lines = read_list(list_file)
    classes = sorted({line.split("/")[0] for line in lines})
    labels = {wnid: index for index, wnid in enumerate(classes)}
    env = lmdb.open(lmdb_path, map_size=1 << 40)
    txn = env.begin(write=True)
    for count, line in enumerate(lines, start=1):
        image = cv2.imread(os.path.join(image_path, line))
        ok, encoded = cv2.imencode(".jpg", image)
        if not ok:
            raise RuntimeError(f"cannot encode {line}")
        txn.put(encode_key(line), encode_record(encoded.tobytes(), labels[line.split("/")[0]]))
        if count % 1000 == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()


def adopt_orphaned_descendants() -> bool:
    """Become the parent of descendants whose own parent exits first (Linux only).

    The packer's workers are children of multiprocessing's fork server, which the packer leaves
    to exit on its own: without adopting it, its CPU time, the workers' included, goes uncounted.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_adopted() -> None:
    """Wait for every remaining child, adopted ones included, so that their CPU time is counted."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def timed(command: list[str]) -> tuple[float, float]:
    """Wall-clock and CPU seconds (user + system, its worker processes included) of a command.

    The CPU time shows the work done whatever else the machine is running at the same time.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    reap_adopted()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def count_decodable(lmdb_path: str) -> int:
    """Decode every stored image in full; returns how many there are."""
    env = lmdb.open(lmdb_path, readonly=True, lock=False)
    count = 0
    with env.begin() as txn:
        for _, value in txn.cursor():
            image_bytes, _ = decode_record(value)
            if decode_rgb(image_bytes).ndim != 3:
                raise RuntimeError(f"an image in {lmdb_path} did not decode to RGB")
            count += 1
    env.close()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", nargs=3, metavar=("IMAGE_PATH", "LIST_FILE", "LMDB_PATH"),
                        help=argparse.SUPPRESS)  # the baseline's own process
    args = parser.parse_args()
    if args.baseline:
        pack_like_original(*args.baseline)
        return
    counts_all_cpu = adopt_orphaned_descendants()

    with tempfile.TemporaryDirectory() as root:
        tree = os.path.join(root, "imagenet")
        write_photo_tree(tree, {"train": -(-args.num_images // NUM_CLASSES)},
                         num_classes=NUM_CLASSES,
                         side_range=(300, 1000))
        subprocess.run([sys.executable, "dataset/mk_img_list.py", "--image_path", tree,
                        "--output_path", root],
                       check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        list_file = os.path.join(root, "train_list.txt")
        num_images = len(read_list(list_file))

        ours, baseline = [], []
        for run in range(args.repeats):
            out = os.path.join(root, f"ours{run}")
            ours.append(timed([sys.executable, "dataset/img2lmdb.py", "--image_path", tree,
                               "--list_path", root,
                               "--output_path", out, "--split", "train"]))
            base_lmdb = os.path.join(root, f"baseline{run}")
            baseline.append(timed([sys.executable, os.path.abspath(__file__), "--baseline",
                                   os.path.join(tree, "train"), list_file, base_lmdb]))
        for path in (os.path.join(root, "ours0", "train"), os.path.join(root, "baseline0")):
            if count_decodable(path) != num_images:
                raise RuntimeError(f"{path} does not hold all {num_images} images")

        (ours_wall, ours_cpu), (base_wall, base_cpu) = min(ours), min(baseline)
        print(f"{num_images} images, {os.cpu_count()} cores, best of {args.repeats}; "
              f"every stored image decoded afterwards")
        if not counts_all_cpu:
            print("note: not on Linux: the CPU time of img2lmdb.py's workers is not counted")
        print(f"img2lmdb.py: {ours_wall:.2f} s wall, {ours_cpu:.2f} s CPU "
              f"({num_images / ours_wall:.0f} img/s); original-style single-process decode + "
              f"re-encode: {base_wall:.2f} s wall, {base_cpu:.2f} s CPU "
              f"({num_images / base_wall:.0f} img/s)")
        print(f"pack speed-up vs original-style packer: {base_wall / ours_wall:.1f}x wall-clock "
              f"({base_cpu / ours_cpu:.1f}x less CPU time)")

if __name__ == "__main__":
    main()
