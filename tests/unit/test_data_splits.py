"""Data: the idx reader, fixed stratified splits, sample shapes."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from thaw_contract.spec import DataSpec, SpecError
from trainer.data import build_datasets, read_idx, split_train_val, stratified_take


def test_read_idx_parses_gzipped_and_plain(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\0\0\x08\x03" + struct.pack(">III", 2, 3, 4) + data.tobytes()
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "x").write_bytes(raw)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), data)
    assert np.array_equal(read_idx(tmp_path / "x"), data)
    (tmp_path / "bad").write_bytes(b"\1\2\3\4")
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        read_idx(tmp_path / "bad")


def test_splits_are_stratified_disjoint_and_fixed_by_seed():
    labels = torch.tensor(np.repeat(np.arange(5), 40))
    spec = DataSpec(source="digits", train_per_class=10, val_per_class=5)
    train, val = split_train_val(labels, spec, seed=3)
    assert len(set(train) & set(val)) == 0
    assert np.bincount(labels[train].numpy()).tolist() == [10] * 5
    assert np.bincount(labels[val].numpy()).tolist() == [5] * 5
    train2, val2 = split_train_val(labels, spec, seed=3)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert not np.array_equal(split_train_val(labels, spec, seed=4)[0], train)
    assert len(stratified_take(labels, None, 0.5, 0)) == 100


def test_digits_samples_are_rgb_uint8_at_image_size():
    ds = build_datasets(DataSpec(source="digits", image_size=32, val_per_class=5), num_classes=10, seed=0)
    x, y = ds.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and 0 <= y < 10
    assert len(ds.val) == 50 and len(ds.test) > 500


def test_class_count_mismatch_names_num_classes():
    with pytest.raises(SpecError, match="spec.model.numClasses: 5 does not match the 10 classes of digits"):
        build_datasets(DataSpec(source="digits"), num_classes=5, seed=0)


def test_fashion_mnist_from_the_debian_package():
    ds = build_datasets(
        DataSpec(source="fashion-mnist", image_size=28, train_per_class=3, val_per_class=2, test_limit=7),
        num_classes=10,
        seed=0,
    )
    assert len(ds.train) == 30 and len(ds.val) == 20 and len(ds.test) == 7
    assert ds.classes[0] == "T-shirt/top"


def test_image_folder_layout_errors_name_the_source(tmp_path):
    with pytest.raises(SpecError, match="spec.data.source: .*train is not a directory"):
        build_datasets(DataSpec(source=f"file://{tmp_path}"), num_classes=2, seed=0)


def _folder(root, per_class=(6, 6), test=2, classes=("dark", "light")):
    """A tiny ImageFolder of 8 px PNGs: train/<class>/i.png and test/<class>/i.png."""
    from torchvision.io import encode_png

    for split, counts in (("train", per_class), ("test", (test,) * len(classes))):
        for label, n in zip(classes, counts):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = torch.full((3, 8, 8), 40 if label == "dark" else 200, dtype=torch.uint8)
                (root / split / label / f"{i}.png").write_bytes(encode_png(img).numpy().tobytes())
    return f"file://{root}"


def test_an_image_that_does_not_decode_is_skipped_named_and_another_stands_in(tmp_path):
    from trainer.bad_images import check, verdict

    src = _folder(tmp_path)
    png = (tmp_path / "train/dark/1.png").read_bytes()
    (tmp_path / "train/dark/0.png").write_bytes(b"not an image at all")
    (tmp_path / "train/light/2.png").write_bytes(png[: len(png) // 2])  # truncated
    ds = build_datasets(DataSpec(source=src, image_size=16, val_per_class=1), num_classes=2, seed=0)
    samples = [ds.train[k] for k in range(len(ds.train))] + [ds.val[k] for k in range(len(ds.val))]
    assert all(x.shape == (3, 16, 16) for x, _ in samples)  # every batch keeps its shape
    seen = ds.bad.seen()
    assert sorted(seen) == ["train/dark/0.png", "train/light/2.png"]
    # PIL cannot tell a truncated PNG header from garbage: both are "cannot identify image file".
    assert seen == dict.fromkeys(seen, "UnidentifiedImageError: cannot identify image file")
    warnings = []
    total = len(ds.train) + len(ds.val) + len(ds.test)
    from trainer.distributed import DistEnv

    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    assert check(ds.bad, total, 0.5, env, warnings.append) == {"count": 2, "first": sorted(seen)}
    assert warnings == [
        f"warning: data: 2 of {total} images do not decode; skipped: "
        + ", ".join(f"{n} ({seen[n]})" for n in sorted(seen))
    ]
    check(ds.bad, total, 0.5, env, warnings.append)
    assert len(warnings) == 1  # said once, not every epoch
    line = verdict(seen, total, 0.001)
    assert line.startswith(f"spec.data.maxBadFraction: 2 of {total} images do not decode (") and "\n" not in line
    assert "first: train/dark/0.png (UnidentifiedImageError: cannot identify image file)" in line
    assert line.endswith("or raise maxBadFraction")
    with pytest.raises(SpecError, match=r"^spec.data.maxBadFraction: 2 of 16 images"):
        check(ds.bad, total, 0.001, env, warnings.append)


def test_bad_images_recorded_in_dataloader_workers_reach_the_main_process(tmp_path):
    from torch.utils.data import DataLoader

    src = _folder(tmp_path, per_class=(8, 8))
    for i in (0, 3, 5):
        (tmp_path / f"train/light/{i}.png").write_bytes(b"\x89PNG broken")
    ds = build_datasets(DataSpec(source=src, image_size=16, val_per_class=1), num_classes=2, seed=0)
    for _ in DataLoader(ds.train, batch_size=4, num_workers=2):
        pass
    for _ in DataLoader(ds.val, batch_size=4, num_workers=2):
        pass
    assert sorted(ds.bad.seen()) == [f"train/light/{i}.png" for i in (0, 3, 5)]


def test_a_split_where_nothing_decodes_is_one_line(tmp_path):
    src = _folder(tmp_path, per_class=(3, 3), test=1)
    for p in (tmp_path / "test").rglob("*.png"):
        p.write_bytes(b"garbage")
    ds = build_datasets(DataSpec(source=src, image_size=16, val_per_class=1), num_classes=2, seed=0)
    with pytest.raises(SpecError, match="^spec.data.source: no image of the test split decodes$"):
        ds.test[0]


@pytest.mark.parametrize(
    "layout,spec,message",
    [
        ({"per_class": (6, 0)}, {}, r"^spec.data.source: .*/train/light holds no images \(ImageFolder"),
        ({"test": 0}, {}, r"^spec.data.source: .*/test/dark holds no images"),
        ({"per_class": (6, 3)}, {"val_per_class": 3}, "^spec.data.valPerClass: 3 leaves no training images of "
         "class 'light', which has 3; use at most 2$"),
        ({}, {"val_per_class": 2, "train_per_class": 5}, r"^spec.data.trainPerClass: 5 is more than class 'dark' "
         r"has after valPerClass \(6 - 2 = 4\); use at most that, or leave it unset for all$"),
    ],
)  # fmt: skip
def test_data_shape_mistakes_are_one_line_naming_the_field(tmp_path, layout, spec, message):
    src = _folder(tmp_path, **layout)
    with pytest.raises(SpecError, match=message) as err:
        build_datasets(DataSpec(source=src, image_size=16, **spec), num_classes=2, seed=0)
    assert "\n" not in str(err.value)


def test_a_class_folder_missing_from_test_is_named(tmp_path):
    src = _folder(tmp_path)
    (tmp_path / "train/extra").mkdir()
    (tmp_path / "train/extra/0.png").write_bytes((tmp_path / "train/dark/0.png").read_bytes())
    with pytest.raises(SpecError, match=r"^spec.data.source: the class folders of .*test and .*train differ "
                       r"\(only in one: extra\)$"):  # fmt: skip
        build_datasets(DataSpec(source=src, image_size=16, val_per_class=1), num_classes=3, seed=0)
