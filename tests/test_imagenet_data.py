"""ImageNet12's loaders over LMDBs and JPEG folders, in one process and in a two-process group."""

from __future__ import annotations

import os
import pickle
import random
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.transforms import v2

from dataset import img2lmdb, jpeg_region, mk_img_list
from dataset.folder_dataset import FolderDataset
from dataset.imagenet_data import ImageNet12, ShardSampler, collate_uint8
from dataset.transforms import RandomChain
from tests.conftest import NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, truncate_file
from utils.config import ConfigError
from utils.errors import DataError

SIZE = 64  # small outputs keep the loaders quick; the transforms' tests use 224
BATCH = 8
NUM_TRAIN = NUM_CLASSES * TRAIN_PER_CLASS + 4  # + the odd files of the fixture tree
NUM_VAL = NUM_CLASSES * VAL_PER_CLASS + 1


def data_config(data_type: str, **extra) -> dict:
    return {"input_size": (3, SIZE, SIZE), "train_data_type": data_type, "val_data_type": data_type,
            "train_list": "train_list.txt", "val_list": "val_list.txt",
            "type_of_data_aug": "random_sized", "random_sized": {"min_scale": 0.08}, "color": False,
            **extra}


@pytest.fixture(scope="module")
def data_roots(photo_tree, tmp_path_factory) -> dict[str, str]:
    """The fixture tree as JPEG folders (lists beside them) and as LMDBs made by the packer."""
    root = str(tmp_path_factory.mktemp("data"))
    img_root = os.path.join(root, "img")
    shutil.copytree(photo_tree, img_root)
    assert mk_img_list.main(["--image_path", img_root, "--output_path", img_root]) == 0
    lmdb_root = os.path.join(root, "lmdb")
    for split in ("train", "val"):
        img2lmdb.pack_split(img_root, img_root, lmdb_root, split, workers=1, progress=False)
        shutil.copy(os.path.join(img_root, f"{split}_list.txt"), lmdb_root)
    return {"img": img_root, "lmdb": lmdb_root}


def make_data(roots: dict[str, str], data_type: str, num_workers: int = 0, **extra) -> ImageNet12:
    root = roots[data_type]
    config = data_config(data_type, **extra)
    return ImageNet12(os.path.join(root, "train"), os.path.join(root, "val"), num_workers,
                      config["type_of_data_aug"], config, pin_memory=False)


def list_labels(root: str, split: str) -> list[int]:
    classes = sorted(os.listdir(os.path.join(root, "train")))
    with open(os.path.join(root, f"{split}_list.txt"), encoding="utf-8") as f:
        return [classes.index(line.split("/")[0]) for line in f.read().split()]


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


# ---------------------------------------------------------------------------------------------
# One process.


@pytest.mark.parametrize("data_type", ["lmdb", "img"])
def test_single_process_loaders(data_roots, data_type):
    data = make_data(data_roots, data_type)
    train_loader, val_loader = data.getTrainTestLoader(BATCH)
    assert (data.train_num_examples, data.test_num_examples) == (NUM_TRAIN, NUM_VAL)
    assert len(train_loader) == NUM_TRAIN // BATCH  # the last, partial batch is dropped
    for images, labels in train_loader:
        assert images.dtype == torch.uint8 and images.shape == (BATCH, 3, SIZE, SIZE)
        assert images.is_contiguous()
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < NUM_CLASSES
    images, labels = collect(val_loader)
    assert images.shape == (NUM_VAL, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert labels.tolist() == list_labels(data_roots["img"], "val")  # in list order
    assert images.float().std() > 10  # real pictures, not blank buffers


def test_lmdb_and_folders_give_the_same_validation_batches(data_roots):
    from_lmdb = collect(make_data(data_roots, "lmdb").getTestLoader(BATCH))
    from_img = collect(make_data(data_roots, "img").getTestLoader(BATCH))
    assert torch.equal(from_lmdb[1], from_img[1])
    assert torch.equal(from_lmdb[0], from_img[0])


def test_train_labels_follow_the_sorted_train_class_folders(data_roots):
    expected = sorted(list_labels(data_roots["img"], "train"))
    for data_type in ("lmdb", "img"):
        dataset = make_data(data_roots, data_type).train_set()
        assert sorted(dataset[i][1] for i in range(len(dataset))) == expected


def test_set_epoch_reshuffles_reproducibly(data_roots):
    loader = make_data(data_roots, "img").getTrainLoader(BATCH)
    loader.sampler.set_epoch(0)
    first = list(loader.sampler)
    loader.sampler.set_epoch(1)
    second = list(loader.sampler)
    loader.sampler.set_epoch(0)
    assert list(loader.sampler) == first and second != first
    assert sorted(key.index for key in first) == list(range(NUM_TRAIN))
    assert {(key.seed, key.epoch) for key in first + second} == {(0, 0), (0, 1)}


def test_an_epoch_started_part_way_yields_the_rest_of_its_batches(data_roots):
    loader = make_data(data_roots, "img").getTrainLoader(BATCH)
    loader.sampler.set_epoch(2)
    whole = list(loader.sampler)
    steps = len(loader)
    loader.sampler.set_epoch(2, skip=BATCH)
    assert list(loader.sampler) == whole[BATCH:] and len(loader) == steps - 1
    loader.sampler.set_epoch(2, skip=steps * BATCH)
    assert len(loader) == 0 and list(loader) == []


def test_training_batches_do_not_depend_on_the_loader_workers(data_roots):
    """Each sample's crop, flip and colour jitter come from its (seed, epoch, index), not from
    the worker that makes it: 0, 1 or 4 workers give the same batches, and so does a pass that
    starts part way into the epoch."""
    def batches(num_workers: int, epoch: int, skip: int = 0) -> torch.Tensor:
        loader = make_data(data_roots, "lmdb", num_workers, color=True).getTrainLoader(BATCH)
        loader.sampler.seed = 7
        loader.sampler.set_epoch(epoch, skip=skip)
        return torch.cat([images for images, _ in loader])

    reference = batches(0, epoch=1)
    assert torch.equal(batches(1, epoch=1), reference)
    assert torch.equal(batches(4, epoch=1), reference)
    assert torch.equal(batches(4, epoch=1, skip=BATCH), reference[BATCH:])
    assert not torch.equal(batches(0, epoch=2), reference)


def with_torchvision_augmentations(compose: type) -> type:
    """The README's recipe: torchvision v2 transforms composed after our crop, by our
    RandomChain or by torchvision's own Compose."""

    class WithTorchvisionAugmentations(ImageNet12):
        def train_transform(self):
            return compose([super().train_transform(), v2.RandAugment(), v2.RandomErasing(p=1.0)])

    return WithTorchvisionAugmentations


@pytest.mark.parametrize("compose", [RandomChain, v2.Compose], ids=["RandomChain", "v2.Compose"])
def test_torchvision_v2_transforms_compose_after_the_crop_through_the_loader(data_roots, compose):
    """Our crop hands v2 transforms the uint8 3 x H x W tensor they take; the batches stay uint8
    and, seeded per sample, still do not depend on the number of loader workers."""
    config = data_config("lmdb")

    def batches(num_workers: int, extra: bool = True, seed: int = 5) -> torch.Tensor:
        kind = with_torchvision_augmentations(compose) if extra else ImageNet12
        root = data_roots["lmdb"]
        data = kind(os.path.join(root, "train"), os.path.join(root, "val"), num_workers,
                    "random_sized", config, pin_memory=False)
        loader = data.getTrainLoader(BATCH)
        loader.sampler.seed = seed
        loader.sampler.set_epoch(0)
        return torch.cat([images for images, _ in loader])

    augmented = batches(0)
    assert augmented.dtype == torch.uint8 and augmented.shape[1:] == (3, SIZE, SIZE)
    plain = batches(0, extra=False)
    assert plain.shape == augmented.shape and not torch.equal(plain, augmented)
    # RandomErasing (p=1) fills a box of every image with zeros, which plain crops of photos lack.
    assert all((image == 0).all(dim=0).any() for image in augmented)
    assert torch.equal(batches(2), augmented)
    assert not torch.equal(batches(0, seed=6), augmented)


def test_worker_processes_give_what_the_main_process_gives(data_roots):
    # OpenCV's thread pool, started here, must not trouble the forked workers (a worker that
    # reconfigured it, e.g. with cv2.setNumThreads, would wait forever on its idle threads).
    cv2.resize(np.zeros((2000, 2000, 3), dtype=np.uint8), (500, 500), interpolation=cv2.INTER_AREA)
    data = make_data(data_roots, "lmdb", num_workers=2)
    loader = data.getTestLoader(BATCH)
    assert loader.num_workers == 2
    assert torch.equal(collect(loader)[0],
                       collect(make_data(data_roots, "lmdb").getTestLoader(BATCH))[0])
    train_loader = data.getTrainLoader(BATCH)
    assert train_loader.num_workers == 2 and train_loader.persistent_workers
    images, labels = collect(train_loader)
    assert images.shape == (NUM_TRAIN // BATCH * BATCH, 3, SIZE, SIZE)


class OpenCVThreads:
    """A transform that gives, as its image, the number of threads OpenCV runs in its process."""

    def __call__(self, data: object, *generator: object) -> torch.Tensor:
        return torch.full((3, 2, 2), cv2.getNumThreads(), dtype=torch.uint8)


@pytest.fixture()
def opencv_threads():
    """OpenCV's thread count, restored after the test."""
    saved = cv2.getNumThreads()
    yield
    cv2.setNumThreads(saved)


def test_loader_workers_run_opencv_on_one_thread(data_roots, opencv_threads, monkeypatch):
    """Training and validation workers alike, forked from a process whose OpenCV pool ran on
    three threads."""
    cv2.setNumThreads(3)
    cv2.resize(np.zeros((2000, 2000, 3), dtype=np.uint8), (500, 500), interpolation=cv2.INTER_AREA)
    data = make_data(data_roots, "lmdb", num_workers=2)
    monkeypatch.setattr(data, "train_transform", OpenCVThreads)
    monkeypatch.setattr(data, "val_transform", OpenCVThreads)
    for loader in (data.getTrainLoader(BATCH), data.getTestLoader(BATCH)):
        images = torch.cat([images for images, _ in loader])
        assert images.numel() > 0 and (images == 1).all()


def test_validation_workers_end_with_each_pass(data_roots):
    """Idle through training, persistent validation workers would hold cores the training needs."""
    loader = make_data(data_roots, "lmdb", num_workers=1).getTestLoader(BATCH)
    assert loader.num_workers == 1 and not loader.persistent_workers
    batches = iter(loader)
    workers = list(batches._workers)
    assert workers and all(w.is_alive() for w in workers)
    for _ in batches:
        pass
    assert not any(w.is_alive() for w in workers)


@pytest.mark.parametrize("data_type", ["lmdb", "img"])
def test_datasets_survive_pickling_for_spawned_workers(data_roots, data_type):
    dataset = make_data(data_roots, data_type).val_set()
    clone = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(clone[3][0], dataset[3][0]) and clone[3][1] == dataset[3][1]


def test_rand_scale_and_colour_jitter_batches(data_roots):
    data = make_data(data_roots, "img", type_of_data_aug="rand_scale", color=True)
    # rand_scale resizes the shorter side to 256..480 before cropping the input size
    images, labels = next(iter(data.getTrainLoader(BATCH)))
    assert images.shape == (BATCH, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert data.augmentation == "rand_scale" and data.color


def test_validation_labels_of_jpeg_folders_come_from_the_train_split(data_roots, tmp_path):
    val_root = tmp_path / "val"
    shutil.copytree(os.path.join(data_roots["img"], "val", "n00000003"), val_root / "n00000003")
    list_path = tmp_path / "val_list.txt"
    names = sorted(os.listdir(val_root / "n00000003"))
    list_path.write_text("\n".join(f"n00000003/{name}" for name in names))
    classes = sorted(os.listdir(os.path.join(data_roots["img"], "train")))
    dataset = FolderDataset(str(val_root), str(list_path), classes=classes)
    assert {dataset[i][1] for i in range(len(dataset))} == {3}
    assert FolderDataset(str(val_root), str(list_path))[0][1] == 0  # its own, single class


# ---------------------------------------------------------------------------------------------
# Friendly errors.


def test_missing_lmdb_names_the_packer(data_roots, tmp_path):
    shutil.copy(os.path.join(data_roots["lmdb"], "train_list.txt"), tmp_path)
    data = ImageNet12(str(tmp_path / "train"), str(tmp_path / "val"), 0, "random_sized",
                      data_config("lmdb"))
    with pytest.raises(DataError, match="img2lmdb.py"):
        data.getTrainLoader(BATCH)


def test_missing_list_names_the_list_maker(data_roots, tmp_path):
    shutil.copytree(os.path.join(data_roots["img"], "val"), tmp_path / "val")
    data = ImageNet12(str(tmp_path / "train"), str(tmp_path / "val"), 0, "random_sized",
                      data_config("img", train_data_type="lmdb"))
    with pytest.raises(DataError, match="mk_img_list.py"):
        data.getTestLoader(BATCH)


def test_missing_image_folder_names_the_setting(tmp_path):
    data = ImageNet12(str(tmp_path / "train"), str(tmp_path / "val"), 0, "random_sized",
                      data_config("img"))
    with pytest.raises(DataError, match="data.data_path"):
        data.getTrainLoader(BATCH)


@pytest.mark.parametrize("key,value", [("train_data_type", "jpeg"), ("val_data_type", "tfrecord")])
def test_unknown_data_type_is_a_config_error(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"data.{key} must be one of lmdb, img, got '{value}'"):
        ImageNet12(str(tmp_path / "train"), str(tmp_path / "val"), 0, "random_sized",
                   data_config("img", **{key: value}))


def test_unknown_augmentation_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="random_sized, rand_scale"):
        ImageNet12(str(tmp_path / "train"), str(tmp_path / "val"), 0, "autoaugment",
                   data_config("img"))


def test_unknown_decoder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError,
                       match="data.decoder must be one of auto, region, opencv, got 'turbo'"):
        ImageNet12(str(tmp_path / "train"), str(tmp_path / "val"), 0, "random_sized",
                   data_config("img", decoder="turbo"))


def test_rand_scale_logs_the_decoder_it_uses(tmp_path, monkeypatch):
    """rand_scale decodes whole images: the log says so, and data.decoder='region' needs no
    region decoder for it."""
    monkeypatch.setattr(jpeg_region, "region_decoder", lambda: None)
    data = ImageNet12(str(tmp_path / "train"), str(tmp_path / "val"), 0, "rand_scale",
                      data_config("img", decoder="region"))
    assert data.describe_decoder() == "OpenCV, whole images (data.type_of_data_aug='rand_scale')"


def test_region_decoder_asked_for_but_unavailable_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(jpeg_region, "region_decoder", lambda: None)
    monkeypatch.setattr(jpeg_region, "describe",
                        lambda: "OpenCV, whole images (region decoding "
                                "unavailable: no C compiler (cc or gcc) on PATH)")
    with pytest.raises(ConfigError, match="no C compiler.*data.decoder='auto'"):
        ImageNet12(str(tmp_path / "train"), str(tmp_path / "val"), 0, "random_sized",
                   data_config("img", decoder="region"))


@pytest.mark.parametrize("decoder", [pytest.param("auto", marks=pytest.mark.region_decoder),
                                     pytest.param("region", marks=pytest.mark.region_decoder),
                                     "opencv"])
def test_decoder_setting_reaches_the_training_crops(data_roots, decoder):
    """'opencv' decodes whole images; 'auto' and 'region' decode the crops alone, here where
    libjpeg-turbo can be built; the batches agree either way."""
    data = make_data(data_roots, "lmdb", decoder=decoder)
    assert data.train_transform().steps[0].region == (decoder != "opencv")
    expected = "OpenCV, whole images" if decoder == "opencv" else "libjpeg-turbo"
    assert data.describe_decoder().startswith(expected)
    loader = data.getTrainLoader(BATCH)
    torch.manual_seed(0)
    random.seed(0)
    images, _ = next(iter(loader))
    reference_loader = make_data(data_roots, "lmdb", decoder="opencv").getTrainLoader(BATCH)
    torch.manual_seed(0)
    random.seed(0)
    reference, _ = next(iter(reference_loader))
    assert torch.equal(images, reference)


def test_list_naming_an_unknown_class_is_reported(data_roots, tmp_path):
    list_path = tmp_path / "val_list.txt"
    list_path.write_text("n09999999/x.JPEG\n")
    with pytest.raises(DataError, match="n09999999"):
        FolderDataset(os.path.join(data_roots["img"], "val"), str(list_path), classes=["n00000000"])


def test_unreadable_image_names_its_file(data_roots, tmp_path):
    root = tmp_path / "img"
    shutil.copytree(data_roots["img"], root)
    with open(root / "val_list.txt", encoding="utf-8") as f:
        first = f.readline().strip()
    truncate_file(str(root / "val" / first), keep_fraction=0.02)
    dataset = make_data({"img": str(root)}, "img").val_set()
    with pytest.raises(DataError, match=first):
        dataset[0]


# ---------------------------------------------------------------------------------------------
# Samplers and collation.


@pytest.mark.parametrize("size", [0, 1, 5, 13, 16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_sampler_covers_every_index_once(size, world):
    shards = [list(ShardSampler(size, world, rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    lengths = [len(ShardSampler(size, world, rank)) for rank in range(world)]
    assert lengths == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_sampler_rejects_a_rank_outside_the_group():
    with pytest.raises(ValueError, match="rank 2"):
        ShardSampler(10, 2, 2)


def test_collate_writes_planar_and_interleaved_images_alike():
    rng = np.random.default_rng(0)
    planar = [rng.integers(0, 256, (3, 5, 7), dtype=np.uint8) for _ in range(3)]
    images, labels = collate_uint8([(image, label) for label, image in enumerate(planar)])
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 5, 7)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2]
    assert np.array_equal(images.numpy(), np.stack(planar))
    interleaved = [(np.ascontiguousarray(p.transpose(1, 2, 0)), 7) for p in planar]
    assert torch.equal(collate_uint8(interleaved)[0], images)


def test_collate_refuses_float_images():
    with pytest.raises(TypeError):
        collate_uint8([(np.zeros((3, 4, 4), dtype=np.float32), 0)])


# ---------------------------------------------------------------------------------------------
# Two processes: a gloo group started with spawn.


def _rank_main(rank: int, world_size: int, store_path: str, roots: dict[str, str],
               out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size)
    try:
        result = {}
        for data_type in ("lmdb", "img"):
            data = make_data(roots, data_type)
            train_loader, val_loader = data.getTrainTestLoader(BATCH // 2)
            train_loader.sampler.set_epoch(3)
            result[data_type] = {
                "train_indices": [key.index for key in train_loader.sampler],
                "train_steps": sum(1 for _ in train_loader),
                "val_indices": list(val_loader.sampler),
                "val": collect(val_loader),
            }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_shard_train_and_validation(data_roots, tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), data_roots, str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for data_type in ("lmdb", "img"):
        single = collect(make_data(data_roots, data_type).getTestLoader(BATCH))
        r0, r1 = ranks[0][data_type], ranks[1][data_type]
        # Training: disjoint halves, the same number of steps everywhere.
        assert len(r0["train_indices"]) == len(r1["train_indices"]) == NUM_TRAIN // 2
        assert not set(r0["train_indices"]) & set(r1["train_indices"])
        assert r0["train_steps"] == r1["train_steps"] == (NUM_TRAIN // 2) // (BATCH // 2)
        # Validation: every image exactly once over the ranks, as in one process.
        assert sorted(r0["val_indices"] + r1["val_indices"]) == list(range(NUM_VAL))
        merged_images = torch.empty_like(single[0])
        merged_labels = torch.empty_like(single[1])
        for rank in (r0, r1):
            merged_images[rank["val_indices"]] = rank["val"][0]
            merged_labels[rank["val_indices"]] = rank["val"][1]
        assert torch.equal(merged_images, single[0]) and torch.equal(merged_labels, single[1])
