"""DevicePrefetcher: normalisation, labels, length, memory format; its side stream on CUDA."""

from __future__ import annotations

import pytest
import torch

from dataset.prefetch_data import DevicePrefetcher

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def uint8_batches(count: int = 3, batch: int = 4,
                  size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator),
             torch.randint(0, 1000, (batch,), generator=generator))
            for _ in range(count)]


def reference(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.double() / 255 - mean.double()) / std.double()


def test_yields_normalised_float_images_and_int64_labels():
    batches = uint8_batches()
    prefetcher = DevicePrefetcher(batches, "cpu", MEAN, STD)
    assert len(prefetcher) == len(batches)
    seen = list(prefetcher)
    assert len(seen) == len(batches)
    for (images, labels), (raw_images, raw_labels) in zip(seen, batches):
        assert images.dtype == torch.float32 and images.device.type == "cpu"
        assert images.shape == raw_images.shape and images.is_contiguous()
        torch.testing.assert_close(images.double(), reference(raw_images), atol=1e-5, rtol=0)
        assert labels.dtype == torch.int64 and torch.equal(labels, raw_labels)


@pytest.mark.parametrize("as_type", [tuple, list, torch.tensor], ids=["tuple", "list", "tensor"])
def test_mean_and_std_as_any_sequence_of_numbers(as_type):
    batches = uint8_batches(count=1)
    (images, _), = DevicePrefetcher(batches, "cpu", as_type(MEAN), as_type(STD))
    torch.testing.assert_close(images.double(), reference(batches[0][0]), atol=1e-5, rtol=0)


def test_leaves_the_loaders_batches_untouched():
    batches = uint8_batches(count=1)
    original = batches[0][0].clone()
    list(DevicePrefetcher(batches, torch.device("cpu"), MEAN, STD))
    assert torch.equal(batches[0][0], original)


def test_channels_last_output():
    images, _ = next(iter(DevicePrefetcher(uint8_batches(), "cpu", MEAN, STD, channels_last=True)))
    assert images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images.double(), reference(uint8_batches()[0][0]), atol=1e-5, rtol=0)


def test_each_iteration_is_a_new_pass():
    prefetcher = DevicePrefetcher(uint8_batches(count=2), "cpu", MEAN, STD)
    first = [images for images, _ in prefetcher]
    second = [images for images, _ in prefetcher]
    assert len(first) == len(second) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_length_of_an_unsized_loader_is_a_type_error():
    prefetcher = DevicePrefetcher(iter(uint8_batches()), "cpu", MEAN, STD)
    with pytest.raises(TypeError, match="no length"):
        len(prefetcher)


def test_extreme_values_map_to_the_ends_of_the_normalised_range():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    images = images.contiguous()
    batches = [(images, torch.zeros(1, dtype=torch.int64))]
    out, _ = next(iter(DevicePrefetcher(batches, "cpu", MEAN, STD)))
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-MEAN[c] / STD[c], abs=1e-5)
        assert out[0, c, 0, 1].item() == pytest.approx((1 - MEAN[c]) / STD[c], abs=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_passes_share_one_side_stream():
    """A stream per pass would strand each pass's batch buffers in the caching allocator."""
    batches = uint8_batches()
    prefetcher = DevicePrefetcher(batches, "cuda", MEAN, STD, channels_last=True)
    copy_streams = []
    normalize = prefetcher.normalize

    def recording_normalize(images: torch.Tensor) -> torch.Tensor:  # runs where the copies run
        copy_streams.append(torch.cuda.current_stream(prefetcher.device).cuda_stream)
        return normalize(images)

    prefetcher.normalize = recording_normalize
    for _ in range(3):  # e.g. three epochs, or training and validation passes
        seen = list(prefetcher)
        assert len(seen) == len(batches)
        for (images, labels), (raw_images, raw_labels) in zip(seen, batches):
            assert images.device.type == "cuda"
            assert images.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(images.double().cpu(), reference(raw_images), atol=1e-5,
                                       rtol=0)
            assert torch.equal(labels.cpu(), raw_labels)
    assert len(copy_streams) == 3 * len(batches)
    assert set(copy_streams) == {prefetcher.stream.cuda_stream}
    assert prefetcher.stream.cuda_stream != torch.cuda.default_stream(prefetcher.device).cuda_stream
