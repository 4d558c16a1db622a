"""Datasets: where images come from, how they are split, and what one sample looks like.

Samples are uint8 tensors (3, S, S); normalization to float happens on the device in the
training loop (a quarter of the bytes cross the host-device link). Splits are stratified
and fixed by the job seed, so every rank, every stage and every rerun sees the same ones.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from thaw_contract.spec import AugmentationSpec, DataSpec, SpecError
from trainer.bad_images import BadImages, no_image_decodes
from trainer.storage import StoreError

FASHION_MNIST_DIR = Path(os.environ.get("THAW_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass
class ImageSplit:
    """Images (N, C, H, W) uint8 with labels; or a lazy folder dataset."""

    images: torch.Tensor | None
    labels: torch.Tensor
    folder: Dataset | None = None


@dataclass
class Source:
    train: ImageSplit
    test: ImageSplit
    classes: tuple[str, ...]
    bad: BadImages | None = None  # a folder source: images that do not decode (trainer/bad_images.py)


def read_idx(path: Path) -> np.ndarray:
    """The MNIST idx format: magic (2 zero bytes, dtype code, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(cache_dir: Path) -> Source:
    root = FASHION_MNIST_DIR
    if not (root / "train-images-idx3-ubyte.gz").exists():
        root = cache_dir / "FashionMNIST" / "raw"
        if not (root / "train-images-idx3-ubyte").exists():
            try:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(str(cache_dir), train=True, download=True)
                FashionMNIST(str(cache_dir), train=False, download=True)
            except Exception as err:
                raise SpecError(
                    "spec.data.source: fashion-mnist is not installed (apt-get install dataset-fashion-mnist) "
                    f"and could not be downloaded ({type(err).__name__})"
                ) from None

    def load(stem: str) -> np.ndarray:
        for name in (f"{stem}.gz", stem):
            if (root / name).exists():
                return read_idx(root / name)
        raise FileNotFoundError(root / stem)

    def split(prefix: str) -> ImageSplit:
        x = torch.from_numpy(load(f"{prefix}-images-idx3-ubyte").copy()).unsqueeze(1)
        y = torch.from_numpy(load(f"{prefix}-labels-idx1-ubyte").astype(np.int64))
        return ImageSplit(x, y)

    return Source(split("train"), split("t10k"), FASHION_MNIST_CLASSES)


def _digits() -> Source:
    """scikit-learn's bundled 8x8 digits; a fixed 30% stratified test split (seed 0)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255 / 16)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    test = stratified_take(y, per_class=None, fraction=0.3, seed=0)
    train = np.setdiff1d(np.arange(len(y)), test)
    return Source(ImageSplit(x[train], y[train]), ImageSplit(x[test], y[test]), tuple(str(i) for i in range(10)))


def _folder_dirs(uri: str) -> tuple[Path, Path]:
    """(train, test or val) of an ImageFolder source, checked readable; SpecError naming the source."""
    root = Path(uri.removeprefix("file://"))
    if not (root / "train").is_dir():
        raise SpecError(f"spec.data.source: {root}/train is not a directory (ImageFolder layout: train/<class>/*.jpg)")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise SpecError(f"spec.data.source: {root} needs a test/ or val/ folder beside train/")
    for d in (root / "train", test_dir):
        if not os.access(d, os.R_OK | os.X_OK):
            raise SpecError(f"spec.data.source: {d} is not readable by uid {os.getuid()}")
    return root / "train", test_dir


def check_source(spec: DataSpec) -> None:
    """Cheap preflight: the source exists and can be read (no image decoded). A local
    folder or an s3:// prefix is checked; the named datasets are found or fetched later."""
    from trainer.shards import is_shard_source, open_manifest

    if is_shard_source(spec.source, spec.endpoint):
        open_manifest(spec.source, spec.endpoint)
    elif spec.source.startswith("file://"):
        _folder_dirs(spec.source)
    elif spec.source.startswith("s3://"):
        from trainer.datasync import check_prefix

        check_prefix(spec.source, spec.endpoint)


def decode_file(source, size: int) -> torch.Tensor:
    """An image file (a path or a file object) as (3, size, size) uint8. A JPEG is decoded at the
    smallest DCT scale (1, 1/2, 1/4, 1/8) that still covers size x size (libjpeg's draft mode),
    then PIL's bilinear resize, antialiased when it shrinks, on uint8: 3.7x faster than a full
    decode and a float resize for a 1600x1200 photo, 1.2x for a 500x375 one (docs/benchmarks.md
    "decode"). Other formats decode at full size."""
    from PIL import Image

    with Image.open(source) as img:
        img.draft("RGB", (size, size))
        # Decodes here: a corrupt or truncated file raises here (trainer/bad_images.py counts it).
        rgb = np.array(img.convert("RGB").resize((size, size), Image.BILINEAR))
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _folder(uri: str, size: int) -> Source:
    from torchvision.datasets import ImageFolder

    train_dir, test_dir = _folder_dirs(uri)

    def loader(path: str) -> torch.Tensor:
        return decode_file(path, size)

    train = ImageFolder(str(train_dir), loader=loader, allow_empty=True)
    test = ImageFolder(str(test_dir), loader=loader, allow_empty=True)
    if test.classes != train.classes:
        missing = sorted(set(train.classes) - set(test.classes)) or sorted(set(test.classes) - set(train.classes))
        raise SpecError(
            f"spec.data.source: the class folders of {test_dir} and {train_dir} differ (only in one: "
            f"{', '.join(missing)})"
        )
    for ds, d in ((train, train_dir), (test, test_dir)):
        counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(ds.classes))
        empty = [c for c, n in zip(ds.classes, counts) if n == 0]
        if empty:
            raise SpecError(f"spec.data.source: {d}/{empty[0]} holds no images (ImageFolder: one folder per class)")
    labels = lambda ds: torch.tensor(ds.targets, dtype=torch.int64)  # noqa: E731
    bad = BadImages(train_dir.parent)
    return Source(
        ImageSplit(None, labels(train), train), ImageSplit(None, labels(test), test), tuple(train.classes), bad
    )


def _shards(spec: DataSpec) -> Source:
    """A shard set (trainer/shards.py): labels from the manifest, images fetched as they are read."""
    from trainer.datasync import cache_path
    from trainer.shards import ShardFiles, ShardSplit, open_manifest

    m = open_manifest(spec.source, spec.endpoint)
    cache = cache_path(spec.cache_dir, spec.source) / "shards" if spec.source.startswith("s3://") else None
    files = ShardFiles(spec.source, {s.name: s for shards in m.splits.values() for s in shards}, cache, spec.endpoint)
    files.check_room()
    train, test = (ShardSplit(m.splits[s], files, spec.image_size) for s in ("train", "test"))
    for split, name in ((train, "train"), (test, "test")):
        counts = np.bincount(split.labels, minlength=len(m.classes))
        if (counts == 0).any():
            raise SpecError(
                f"spec.data.source: the {name} shards hold no images of class {m.classes[int(np.argmin(counts))]!r}"
            )
    bad = BadImages(Path(ShardSplit.root))
    return Source(
        ImageSplit(None, torch.from_numpy(train.labels), train),
        ImageSplit(None, torch.from_numpy(test.labels), test),
        m.classes,
        bad,
    )


def load_source(spec: DataSpec) -> Source:
    from trainer.shards import is_shard_source

    cache = Path(spec.cache_dir).expanduser()
    if spec.source == "fashion-mnist":
        return _fashion_mnist(cache)
    if spec.source == "digits":
        return _digits()
    if is_shard_source(spec.source, spec.endpoint):
        return _shards(spec)
    return _folder(spec.source, spec.image_size)


def stratified_take(
    labels: torch.Tensor | np.ndarray, per_class: int | None, fraction: float | None, seed: int
) -> np.ndarray:
    """Indices of `per_class` (or `fraction` of each class) samples per class, seeded."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n = per_class if per_class is not None else int(round(len(idx) * (fraction or 0)))
        out.append(idx[: min(n, len(idx))])
    return np.sort(np.concatenate(out))


def check_class_sizes(labels: torch.Tensor, classes: tuple[str, ...], spec: DataSpec) -> None:
    """valPerClass and trainPerClass against the smallest class: one line naming the field."""
    counts = np.bincount(np.asarray(labels), minlength=len(classes))
    c = int(np.argmin(counts))
    n, name = int(counts[c]), classes[c]
    if spec.val_per_class >= n:
        raise SpecError(
            f"spec.data.valPerClass: {spec.val_per_class} leaves no training images of class {name!r}, which has "
            f"{n}; use at most {n - 1}"
        )
    if spec.train_per_class is not None and spec.train_per_class > n - spec.val_per_class:
        raise SpecError(
            f"spec.data.trainPerClass: {spec.train_per_class} is more than class {name!r} has after valPerClass "
            f"({n} - {spec.val_per_class} = {n - spec.val_per_class}); use at most that, or leave it unset for all"
        )


def split_train_val(labels: torch.Tensor, spec: DataSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation first (fixed), then the few-shot training subset from what is left."""
    val = stratified_take(labels, spec.val_per_class, None, seed)
    rest = np.setdiff1d(np.arange(len(labels)), val)
    if spec.train_per_class is None:
        return rest, val
    pick = stratified_take(np.asarray(labels)[rest], spec.train_per_class, None, seed + 1)
    return rest[pick], val


def resize_batch_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) uint8 -> (N, C, size, size) uint8, antialiased; image by image the same
    whether resized alone or in a batch (trainer/resident.py resizes whole splits)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resize_uint8(img: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) uint8 -> (3, size, size) uint8, antialiased; grayscale becomes RGB."""
    img = resize_batch_uint8(img[None], size)[0]
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img


def augment(img: torch.Tensor, aug: AugmentationSpec) -> torch.Tensor:
    if aug.crop_padding:
        p = aug.crop_padding
        size = img.shape[-1]
        padded = F.pad(img, (p, p, p, p))
        i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
        img = padded[:, i : i + size, j : j + size]
    if aug.hflip and torch.rand(()) < 0.5:
        img = img.flip(-1)
    return img


class Images(Dataset):
    """One split's samples, resized (and augmented when training) on access."""

    def __init__(
        self,
        split: ImageSplit,
        indices: np.ndarray,
        size: int,
        aug: AugmentationSpec | None,
        bad: BadImages | None = None,
        name: str = "train",
    ):
        self.split, self.indices, self.size, self.aug = split, indices, size, aug
        self.bad, self.name = bad, name

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> torch.Tensor:
        return self.split.labels[torch.from_numpy(self.indices)]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[k])
        if self.split.folder is not None:
            img, label = self._decoded(k)
        else:
            img, label = self.split.images[i], int(self.split.labels[i])
        img = resize_uint8(img, self.size)
        if self.aug is not None:
            img = augment(img, self.aug)
        return img.contiguous(), label

    def _decoded(self, k: int) -> tuple[torch.Tensor, int]:
        """Sample k of a folder split; one that does not decode is recorded and the next of this
        split stands in (a batch keeps its shape; spec.data.maxBadFraction bounds how many)."""
        folder = self.split.folder
        for step in range(len(self.indices)):
            i = int(self.indices[(k + step) % len(self.indices)])
            try:
                return folder[i]
            except (SpecError, StoreError):  # a shard that cannot be fetched is no bad image
                raise
            except Exception as err:  # PIL raises UnidentifiedImageError or OSError (truncated, vanished)
                if self.bad is None:
                    raise
                self.bad.record(folder.samples[i][0], err)
        raise no_image_decodes(self.name)


@dataclass
class Datasets:
    train: Images
    val: Images
    test: Images
    classes: tuple[str, ...]
    bad: BadImages | None = None


def build_datasets(spec: DataSpec, num_classes: int, seed: int) -> Datasets:
    src = load_source(spec)
    if len(src.classes) != num_classes:
        raise SpecError(
            f"spec.model.numClasses: {num_classes} does not match the {len(src.classes)} classes of {spec.source}"
        )
    check_class_sizes(src.train.labels, src.classes, spec)
    train_idx, val_idx = split_train_val(src.train.labels, spec, seed)
    test_idx = np.arange(len(src.test.labels))[: spec.test_limit]
    aug = spec.augmentation if (spec.augmentation.hflip or spec.augmentation.crop_padding) else None
    return Datasets(
        train=Images(src.train, train_idx, spec.image_size, aug, src.bad, "train"),
        val=Images(src.train, val_idx, spec.image_size, None, src.bad, "validation"),
        test=Images(src.test, test_idx, spec.image_size, None, src.bad, "test"),
        classes=src.classes,
        bad=src.bad,
    )
