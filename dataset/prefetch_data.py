"""Moves uint8 batches (a quarter of float32's bytes) to the training device, normalising them
there; on CUDA on a side stream, batch k + 1 while the model computes on batch k.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Sized

import torch

from utils.device import memory_format_for

Batch = tuple[torch.Tensor, torch.Tensor]


class DevicePrefetcher:
    """Iterating yields ``(images, labels)`` on device: float32 N x 3 x H x W images normalised
    as ``(x / 255 - mean) / std`` (mean and std in 0..1 units, applied to 0..255 data in one
    step), and int64 labels. ``len()`` is the loader's; each iteration starts a new pass."""

    def __init__(self, loader: Iterable[Batch], device: torch.device | str, mean: Sequence[float],
                 std: Sequence[float], channels_last: bool = False) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        scaled = torch.tensor([[float(m) for m in mean], [float(s) for s in std]],
                              dtype=torch.float64) * 255.0  # rounded to float32 once
        self.mean, self.std = scaled.to(self.device, torch.float32).view(2, 1, -1, 1, 1)
        # One side stream for every pass: the caching allocator reuses a freed block only on the
        # stream that allocated it, so a new stream per pass would strand each pass's buffers.
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    def __len__(self) -> int:
        if not isinstance(self.loader, Sized):
            raise TypeError("the wrapped loader has no length")
        return len(self.loader)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images already on the device -> normalised float32, in one new tensor."""
        out = images.to(dtype=torch.float32, memory_format=self.memory_format)
        return out.sub_(self.mean).div_(self.std)

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type == "cuda":
            yield from self._iter_cuda()
        else:
            for images, labels in self.loader:
                yield self.normalize(images.to(self.device)), labels.to(self.device)

    def _iter_cuda(self) -> Iterator[Batch]:
        # The side stream must see everything queued before it (mean and std among them).
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        batches = iter(self.loader)
        pending = self._copy_next(batches)
        while pending is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            images, labels = pending
            # Allocated on the side stream but used on the compute stream: without this, the
            # caching allocator could hand their memory to the next copy while still in use.
            images.record_stream(compute)
            labels.record_stream(compute)
            pending = self._copy_next(batches)
            yield images, labels

    def _copy_next(self, batches: Iterator[Batch]) -> Batch | None:
        """Queue the next batch's copy and normalisation on the side stream; None at the end."""
        try:
            images, labels = next(batches)
        except StopIteration:
            return None
        if not images.is_pinned():  # a pageable source makes non_blocking copies synchronous
            images, labels = images.pin_memory(), labels.pin_memory()
        with torch.cuda.stream(self.stream):
            images = self.normalize(images.to(self.device, non_blocking=True))
            labels = labels.to(self.device, non_blocking=True)
        return images, labels


def on_device(loader: Iterable[Batch], device: torch.device, mean: Sequence[float],
              std: Sequence[float]) -> DevicePrefetcher:
    """loader's batches on device, normalised there, in the memory format the networks use."""
    return DevicePrefetcher(loader, device, mean, std,
                            memory_format_for(device) == torch.channels_last)
