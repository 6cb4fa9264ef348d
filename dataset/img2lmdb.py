"""Pack one split of an ImageNet-layout tree into an LMDB of the original WSLD record format.

Reads ``<list_path>/<split>_list.txt`` (or the original's ``<split>_datalist``) and writes
``<output_path>/<split>`` (``<split>_<N>`` with ``--image_size N``): lossless (RGB and greyscale
JPEGs stored as they are), parallel, resumable, and checked line by line at the end. The official
archives, or a flat val/ folder with ``--val_labels``, give the LMDB of the sorted class folders,
byte for byte. Called from Python, the workers start as fresh processes (mind the ``__main__``
guard); run as a command, it forks them (see ``_worker_context``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import lmdb  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset.image_io import DEFAULT_JPEG_QUALITY, ImageDecodeError, prepare_for_storage  # noqa: E402
from dataset.image_list import class_folders, list_file_path, read_list, write_list  # noqa: E402
from dataset.imagenet_archives import (  # noqa: E402
    Archives,
    archive_val_labels,
    find_archives,
    stream_images,
    train_classes,
)
from dataset.lmdb_format import encode_key, encode_record  # noqa: E402
from dataset.mk_img_list import add_label_arguments, flat_val_labels  # noqa: E402
from utils.errors import DataError  # noqa: E402

INITIAL_MAP_SIZE = 1 << 30  # doubled whenever a commit finds the map full
DEFAULT_COMMIT_EVERY = 1000


class _Task(NamedTuple):
    line: str
    path: str
    label: int


class _Outcome(NamedTuple):
    task: _Task
    # what to store; None for a file kept as is that the worker did not send back
    image_bytes: bytes | None = None
    kept_as_is: bool = False
    fingerprint: tuple[int, int] | None = None  # (size, modification time in ns) of the file read
    error: str | None = None
    missing: bool = False


@dataclass
class PackSummary:
    lmdb_path: str
    list_path: str
    num_classes: int
    stored: int = 0  # list lines found in the LMDB by the final check
    packed: int = 0  # written by this run
    converted: int = 0  # of those, re-encoded rather than kept byte for byte
    already_stored: int = 0  # found from an earlier, interrupted run
    extra_entries: int = 0  # LMDB entries that no list line names
    skipped: list[str] = field(default_factory=list)


def find_list_file(list_dir: str, split: str) -> str:
    candidates = [list_file_path(list_dir, split), os.path.join(list_dir, f"{split}_datalist")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DataError(f"no image list '{candidates[0]}' (nor '{candidates[1]}'); "
                    f"make it with dataset/mk_img_list.py")


def label_map(image_path: str, split: str) -> dict[str, int]:
    """Class folder -> label, numbered by the sorted class folders of train/ (else of the split)."""
    train_dir = os.path.join(image_path, "train")
    source = train_dir if os.path.isdir(train_dir) else os.path.join(image_path, split)
    classes = class_folders(source)
    if not classes:
        raise DataError(f"no class folders in '{source}'")
    return {wnid: index for index, wnid in enumerate(classes)}


def list_labels(lines: list[str], labels: dict[str, int], list_file: str,
                max_key_size: int) -> list[int]:
    """The label of every list line, checked to be unique, well formed and of a known class."""
    seen: set[str] = set()
    result = []
    for number, line in enumerate(lines, start=1):
        wnid, _, name = line.partition("/")
        where = f"line {number} of '{list_file}'"
        if not wnid or not name:
            raise DataError(f"{where} is '{line}', not 'class_folder/file'")
        if wnid not in labels:
            raise DataError(f"{where} names class '{wnid}', which is not among the {len(labels)} "
                            "class folders that number the labels (those of train/)")
        if line in seen:
            raise DataError(f"{where} repeats '{line}'; "
                            "remake the list with dataset/mk_img_list.py")
        if len(encode_key(line)) > max_key_size:
            raise DataError(f"{where} is longer than LMDB's {max_key_size}-byte key limit")
        seen.add(line)
        result.append(labels[wnid])
    return result


def _read_with_fingerprint(path: str) -> tuple[bytes, tuple[int, int]]:
    """A file's bytes and (size, mtime), from the one open file, so they belong together."""
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        return f.read(), (stat.st_size, stat.st_mtime_ns)


def prepare_image(task: _Task, shorter_side: int | None, quality: int, send_kept: bool) -> _Outcome:
    """Worker: read and check one image file. A file kept as is is sent back only if send_kept:
    reading it again from the page cache beats the pipe (the fingerprint tells a change)."""
    try:
        data, fingerprint = _read_with_fingerprint(task.path)
    except FileNotFoundError:
        return _Outcome(task, error="file not found", missing=True)
    except OSError as exc:
        return _Outcome(task, error=str(exc))
    return prepare_bytes((task, data), shorter_side, quality, send_kept, fingerprint)


def prepare_bytes(item: tuple[_Task, bytes], shorter_side: int | None, quality: int,
                  send_kept: bool = False, fingerprint: tuple[int, int] | None = None) -> _Outcome:
    """Worker: check one image's bytes, read from an archive by the main process."""
    task, data = item
    try:
        image_bytes, kept = prepare_for_storage(data, shorter_side, quality)
    except ImageDecodeError as exc:
        return _Outcome(task, error=str(exc))
    return _Outcome(task, None if kept and not send_kept else image_bytes, kept, fingerprint)


def _stored_bytes(outcome: _Outcome) -> bytes:
    """The image bytes to store for a successful outcome, reading a kept file again if needed."""
    if outcome.image_bytes is not None:
        return outcome.image_bytes
    data, fingerprint = _read_with_fingerprint(outcome.task.path)
    if fingerprint != outcome.fingerprint or len(data) != fingerprint[0]:
        raise DataError(f"'{outcome.task.path}' changed while it was being packed; rerun the same "
                        "command")
    return data


def _init_worker() -> None:
    """Pool initializer: Ctrl-C is handled once, by the main process, which saves what it has;
    one OpenCV thread per worker, as the workers already fill the cores."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)


def _worker_context(fork: bool = False) -> multiprocessing.context.BaseContext:
    """Start workers from a fresh interpreter, unless fork says the caller has not used OpenCV: a
    forked child inherits OpenCV's thread pool without its threads, and cv2.setNumThreads then
    waits forever. A fresh worker costs about a third of a second, once (no torch)."""
    methods = multiprocessing.get_all_start_methods()
    if fork and "fork" in methods:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def write_batch(env: lmdb.Environment, batch: list[tuple[bytes, bytes]]) -> None:
    while True:
        try:
            with env.begin(write=True) as txn, txn.cursor() as cursor:
                cursor.putmulti(batch)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def _archive_items(archives: Archives, split: str,
                   tasks: list[_Task]) -> Iterator[tuple[_Task, bytes]]:
    """The tasks' images with their bytes, in archive order (the archive read once, as a stream)."""
    pending = {task.line: task for task in tasks}
    # pending is the stream's wanted: a second member of the same name is no longer in it
    for line, where, data in stream_images(archives, split, pending):
        yield pending.pop(line)._replace(path=where), data
    if pending:
        archive = archives.train if split == "train" else archives.val
        raise DataError(f"{len(pending)} list lines are not in '{archive}' (first: "
                        f"'{min(pending)}'); download the archive again, or remake the list with "
                        "dataset/mk_img_list.py")


def _check_val_lines(lines: list[str], wnid_by_name: dict[str, str], list_file: str,
                     labels_source: str) -> None:
    """The list's validation classes must be the labels': a stale list would store wrong ones."""
    for number, line in enumerate(lines, start=1):
        wnid, _, name = line.partition("/")
        if wnid_by_name.get(name) != wnid:
            raise DataError(f"line {number} of '{list_file}' ('{line}') does not match the labels "
                            f"of {labels_source}; remake the list with dataset/mk_img_list.py")


def _stored_mask(env: lmdb.Environment, lines: list[str]) -> list[bool]:
    with env.begin() as txn, txn.cursor() as cursor:
        return [cursor.set_key(encode_key(line)) for line in lines]


def default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may use
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pack_split(image_path: str, list_path: str, output_path: str, split: str,
               image_size: int | None = None, workers: int | None = None,
               skip_bad: bool = False, commit_every: int = DEFAULT_COMMIT_EVERY,
               jpeg_quality: int = DEFAULT_JPEG_QUALITY, progress: bool = True,
               initial_map_size: int = INITIAL_MAP_SIZE, fork_workers: bool = False,
               val_labels: str | None = None, devkit: str | None = None) -> PackSummary:
    """Pack the images that split's list names into ``<output_path>/<split>[_<image_size>]``.

    Raises DataError for anything the user must fix; what was committed stays, so the same call
    resumes. fork_workers: only for callers that have not used OpenCV (see ``_worker_context``).
    """
    split_dir = os.path.join(image_path, split)
    archives = find_archives(image_path)
    if archives is not None and split not in ("train", "val"):
        raise DataError(f"the official archives in '{image_path}' hold train and val, "
                        f"not '{split}'")
    if archives is None and not os.path.isdir(split_dir):
        raise DataError(f"image folder '{split_dir}' not found; --image_path must hold the "
                        f"{split}/ folder or the official archives")
    if image_size is not None and image_size <= 0:
        raise DataError(f"--image_size must be positive, not {image_size}")
    list_file = find_list_file(list_path, split)
    lines = read_list(list_file)
    if not lines:
        raise DataError(f"image list '{list_file}' is empty; remake it with dataset/mk_img_list.py")
    flat = archives is None and split == "val" and val_labels is not None
    if archives is None and not flat and not class_folders(split_dir):
        raise DataError(f"'{split_dir}' holds no class folders; for a flat validation folder pass "
                        "--val_labels, as to dataset/mk_img_list.py")
    if archives is not None:
        labels = {wnid: index for index, wnid in enumerate(train_classes(archives.train))}
        if split == "val":
            _check_val_lines(lines, archive_val_labels(archives, val_labels), list_file,
                             f"'{archives.val}'")
    else:
        labels = label_map(image_path, split)
        if flat:
            _check_val_lines(lines, flat_val_labels(image_path, val_labels, devkit), list_file,
                             f"'{val_labels}'")
    lmdb_path = os.path.join(output_path, split if image_size is None else f"{split}_{image_size}")
    summary = PackSummary(lmdb_path=lmdb_path, list_path=list_file, num_classes=len(labels))
    try:
        os.makedirs(lmdb_path, exist_ok=True)
        env = lmdb.open(lmdb_path, map_size=initial_map_size, subdir=True, meminit=False)
    except (OSError, lmdb.Error) as exc:
        raise DataError(f"cannot open an LMDB at '{lmdb_path}': {exc}") from None
    try:
        line_labels = list_labels(lines, labels, list_file, env.max_key_size())
        stored = _stored_mask(env, lines)
        tasks = [_Task(line, os.path.join(split_dir, *(line.split("/")[-1:] if flat
                                                       else line.split("/"))), label)
                 for line, label, done in zip(lines, line_labels, stored) if not done]
        summary.already_stored = len(lines) - len(tasks)
        if summary.already_stored:
            print(f"{split}: {summary.already_stored} of {len(lines)} images already in "
                  f"'{lmdb_path}'; packing the other {len(tasks)}", flush=True)
        _pack_tasks(env, tasks, summary, workers=workers or default_workers(),
                    image_size=image_size, jpeg_quality=jpeg_quality, skip_bad=skip_bad,
                    commit_every=commit_every, progress=progress, split=split, fork=fork_workers,
                    archive_items=(_archive_items(archives, split, tasks)
                                   if archives and tasks else None))
        if summary.skipped:  # recorded with those an earlier run skipped, and unlisted
            skipped_file = os.path.join(output_path, f"{split}_skipped.txt")
            earlier = read_list(skipped_file) if os.path.isfile(skipped_file) else []
            skipped = set(summary.skipped)
            write_list(skipped_file, sorted(skipped | set(earlier)))
            lines = [line for line in lines if line not in skipped]
            write_list(list_file, lines)
        stored = _stored_mask(env, lines)
        missing = [line for line, done in zip(lines, stored) if not done]
        if missing:
            raise DataError(f"check failed: {len(missing)} list lines are not in '{lmdb_path}' "
                            f"(first: '{missing[0]}'); rerun the same command")
        summary.stored = len(lines)
        summary.extra_entries = env.stat()["entries"] - len(lines)
    finally:
        env.close()
    return summary


def _archive_outcomes(pool: multiprocessing.pool.Pool, items: Iterable[tuple[_Task, bytes]],
                      work: functools.partial, window: int) -> Iterator[_Outcome]:
    """The workers' outcomes, in archive order: this process reads the next window while they
    check the last, so at most two windows are in memory. A damaged archive's images before the
    damage are still packed, then the error is raised."""
    error = None

    def windows() -> Iterator[list[tuple[_Task, bytes]]]:
        nonlocal error
        current: list[tuple[_Task, bytes]] = []
        try:
            for item in items:
                current.append(item)
                if len(current) == window:
                    yield current
                    current = []
        except DataError as exc:
            error = exc
        if current:
            yield current

    previous = None  # a window, and the workers' pending outcomes for it
    for chunk in itertools.chain(windows(), [None]):  # None: the last window's turn to finish
        submitted = None if chunk is None else (chunk, pool.map_async(work, chunk, chunksize=8))
        if previous is not None:
            done, result = previous
            for (_, data), outcome in zip(done, result.get()):
                yield outcome._replace(image_bytes=data) if outcome.kept_as_is else outcome
        previous = submitted
    if error is not None:
        raise error


def _pack_tasks(env: lmdb.Environment, tasks: list[_Task], summary: PackSummary, *, workers: int,
                image_size: int | None, jpeg_quality: int, skip_bad: bool, commit_every: int,
                progress: bool, split: str, fork: bool,
                archive_items: Iterable[tuple[_Task, bytes]] | None = None) -> None:
    """Prepare the tasks' records in worker processes and commit them in batches: in list order
    from image files, in archive order from archive_items (the tasks' images, read here)."""
    pool = (_worker_context(fork).Pool(min(workers, len(tasks)), initializer=_init_worker)
            if workers > 1 and len(tasks) > 1 else None)
    batch: list[tuple[bytes, bytes]] = []
    bar = tqdm(total=len(tasks), desc=split, unit="img", disable=not progress)
    try:
        work = functools.partial(prepare_image if archive_items is None else prepare_bytes,
                                 shorter_side=image_size, quality=jpeg_quality,
                                 send_kept=pool is None)
        if pool is None:
            outcomes = map(work, tasks if archive_items is None else archive_items)
        elif archive_items is None:
            outcomes = pool.imap(work, tasks, chunksize=16)
        else:
            outcomes = _archive_outcomes(pool, archive_items, work, window=max(64, 32 * workers))
        for outcome in outcomes:
            bar.update()
            task = outcome.task
            if outcome.error is not None:
                if outcome.missing:
                    raise DataError(f"'{task.path}' (list line '{task.line}') not found; the list "
                                    "is out of date: remake it with dataset/mk_img_list.py")
                if not skip_bad:
                    fix = ("download the archive again" if archive_items is not None
                           else "replace or delete it")
                    raise DataError(f"cannot read '{task.path}': {outcome.error}; {fix}, "
                                    f"or pass --skip_bad to leave it out")
                summary.skipped.append(task.line)
                continue
            batch.append((encode_key(task.line), encode_record(_stored_bytes(outcome), task.label)))
            summary.packed += 1
            summary.converted += not outcome.kept_as_is
            if len(batch) >= commit_every:
                write_batch(env, batch)
                batch.clear()
    finally:
        bar.close()
        # Whatever stopped the loop (a bad file, Ctrl-C), the images prepared so far are kept.
        if batch:
            write_batch(env, batch)
        if pool is not None:
            pool.terminate()
            pool.join()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_path", required=True,
                        help="folder holding the split folders (train/, val/), or the three "
                             "official archives")
    parser.add_argument("--list_path", required=True, help="folder holding <split>_list.txt")
    parser.add_argument("--output_path", required=True,
                        help="the LMDB goes to <output_path>/<split>")
    parser.add_argument("--split", required=True, help="split folder to pack, e.g. train or val")
    parser.add_argument("--image_size", type=int, default=None,
                        help="resize the shorter side to this many pixels (LMDB <split>_<N>)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes preparing images (default: all cores)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="leave unreadable images out (named in "
                             "<output_path>/<split>_skipped.txt and removed from the list) "
                             "instead of stopping; a missing file still stops the run, as it "
                             "means the list is out of date")
    parser.add_argument("--commit_every", type=int, default=DEFAULT_COMMIT_EVERY,
                        help="images per LMDB transaction: the most that killing the "
                             "packer can lose")
    parser.add_argument("--jpeg_quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help="quality of the JPEGs written for converted or resized images")
    add_label_arguments(parser)
    args = parser.parse_args(argv)
    if args.workers < 1 or args.commit_every < 1 or not 1 <= args.jpeg_quality <= 100:
        parser.error("--workers and --commit_every must be positive and --jpeg_quality within "
                     "1..100")
    return args


def main(argv: list[str] | None = None, fork_workers: bool = False) -> int:
    """The command; fork_workers only where this process has not used OpenCV."""
    args = parse_args(argv)
    try:
        summary = pack_split(args.image_path, args.list_path, args.output_path, args.split,
                             image_size=args.image_size, workers=args.workers,
                             skip_bad=args.skip_bad, commit_every=args.commit_every,
                             jpeg_quality=args.jpeg_quality, fork_workers=fork_workers,
                             val_labels=args.val_labels, devkit=args.devkit)
    except (DataError, OSError, lmdb.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the images packed so far are saved: rerun the same command "
              "to go on", file=sys.stderr)
        return 130
    if summary.skipped:
        print(f"{args.split}: skipped {len(summary.skipped)} unreadable images, listed in "
              f"'{os.path.join(args.output_path, args.split + '_skipped.txt')}' and removed from "
              f"'{summary.list_path}'")
    if summary.extra_entries > 0:
        print(f"{args.split}: note: {summary.extra_entries} LMDB entries are not in the list (from "
              "an earlier list?)")
    print(f"{args.split}: {summary.stored} images stored in '{summary.lmdb_path}', every list line "
          f"checked ({summary.packed} packed now, {summary.converted} of them converted to RGB "
          f"JPEG; {summary.already_stored} already there; labels from {summary.num_classes} "
          "classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(fork_workers=True))
