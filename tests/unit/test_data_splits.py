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
