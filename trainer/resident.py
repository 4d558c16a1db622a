"""Data kept on the device: a data set that fits is resized once, in batches, and held there
as uint8; batches are drawn by index and augmented on the device. No worker processes, no
per-sample Python, no host-to-device copy per step (a GPU step at batch 1,024 is shorter than
the per-sample path takes to build one batch).

The batches are those of the DataLoader path: the same sampler, the same order, the same
pixels (the batched resize is the per-sample resize, image by image). Only augmentation draws
from another stream: one device generator per epoch, seeded from (job seed, epoch, rank), so a
resumed epoch repeats exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from thaw_contract.spec import AugmentationSpec
from trainer.data import Images, resize_batch_uint8

RESIZE_CHUNK = 2048  # images resized per call: bounds the float32 working set


class ResidentImages(Dataset):
    """One split's images (N, C, S, S) uint8 and labels on `device`; C is 1 for grayscale
    (expanded to 3 when a batch is drawn, a view)."""

    def __init__(self, source: Images, device: torch.device):
        split, size = source.split, source.size
        idx = torch.from_numpy(source.indices)
        chunks = []
        for part in idx.split(RESIZE_CHUNK):
            chunks.append(resize_batch_uint8(split.images[part].to(device), size))
        self.pixels = torch.cat(chunks) if chunks else torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
        self.labels = source.labels  # on the host: the feature cache and the samplers read it there
        self.device_labels = self.labels.to(device)
        self.aug = source.aug

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pixels[index]
        if self.aug is not None and generator is not None:
            x = augment_batch(x, self.aug, generator)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x, self.device_labels[index]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(torch.tensor([k], device=self.pixels.device))
        return x[0], int(y[0])


def augment_batch(x: torch.Tensor, aug: AugmentationSpec, g: torch.Generator) -> torch.Tensor:
    """data.augment for a whole batch: a random crop of the zero-padded image, then a flip."""
    n, _, size, _ = x.shape
    if aug.crop_padding:
        p = aug.crop_padding
        padded = F.pad(x, (p, p, p, p))
        offsets = torch.randint(0, 2 * p + 1, (2, n), device=x.device, generator=g)
        ar = torch.arange(size, device=x.device)
        rows = (offsets[0][:, None] + ar)[:, None, :, None]  # (n, 1, S, 1)
        cols = (offsets[1][:, None] + ar)[:, None, None, :]  # (n, 1, 1, S)
        b = torch.arange(n, device=x.device)[:, None, None, None]
        c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[b, c, rows, cols]
    if aug.hflip:
        flip = torch.rand(n, device=x.device, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


class ResidentBatches:
    """What the runner asks of a DataLoader (`sampler`, `generator`, len, iteration), over a
    ResidentImages. A training loader's `generator` is seeded by the runner each epoch;
    augmentation draws from a device generator derived from it and the rank."""

    def __init__(
        self,
        data: ResidentImages,
        batch_size: int,
        sampler: Sampler,
        drop_last: bool,
        rank: int = 0,
        generator: torch.Generator | None = None,
    ):
        self.data, self.batch_size, self.sampler, self.drop_last, self.rank = data, batch_size, sampler, drop_last, rank
        self.generator = generator

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        device = self.data.pixels.device
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=device)
        # The draw a DataLoader iterator makes for its base seed (from the global stream when it
        # has no generator): the same draw here keeps dropout's stream, and so the weights, the same.
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
        g = torch.Generator(device=device).manual_seed(seed + self.rank)
        for k in range(len(self)):
            yield self.data.batch(order[k * self.batch_size : (k + 1) * self.batch_size], g)


def fits(datasets: list[Images], device: torch.device, share: float = 0.25) -> bool:
    """Held as uint8 they take at most `share` of the device's free memory (CUDA), or are
    tensor-backed at all (other devices: the images are already in memory)."""
    if any(d.split.images is None for d in datasets):
        return False
    if device.type != "cuda":
        return True
    need = sum(len(d) * d.split.images.shape[1] * d.size * d.size for d in datasets)
    free, _ = torch.cuda.mem_get_info(device)
    return need <= share * free
