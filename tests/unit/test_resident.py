"""Data held on the device gives the DataLoader path's batches, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from tests.builders import job_doc
from thaw_contract.spec import AugmentationSpec, SpecError, parse_job
from trainer.data import Datasets, Images, ImageSplit, build_datasets
from trainer.resident import ResidentBatches, ResidentImages, augment_batch
from trainer.runner import resident_data

CPU = torch.device("cpu")


def _digits(size=32, aug=None) -> Images:
    data = build_datasets(parse_job(job_doc(data={"source": "digits", "imageSize": size})).spec.data, 10, 0)
    return Images(data.train.split, data.train.indices, size, aug)


def test_resident_pixels_are_the_per_sample_resize():
    images = _digits()
    resident = ResidentImages(images, CPU)
    x, y = resident.batch(torch.arange(len(images)))
    expected = torch.stack([images[i][0] for i in range(len(images))])
    assert torch.equal(x, expected)
    assert torch.equal(y, images.labels)


def test_batches_follow_the_sampler_like_a_dataloader():
    images = _digits()
    resident = ResidentImages(images, CPU)
    for epoch in (0, 1):
        s1 = DistributedSampler(images, num_replicas=2, rank=1, shuffle=True, seed=3)
        s2 = DistributedSampler(images, num_replicas=2, rank=1, shuffle=True, seed=3)
        s1.set_epoch(epoch), s2.set_epoch(epoch)
        ours = list(ResidentBatches(resident, 32, s1, drop_last=True, rank=1))
        theirs = list(DataLoader(images, batch_size=32, sampler=s2, drop_last=True))
        assert len(ours) == len(theirs) == len(s1) // 32
        for (xa, ya), (xb, yb) in zip(ours, theirs):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augmentation_crops_windows_of_the_padded_image_and_repeats_per_seed():
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    aug = AugmentationSpec(crop_padding=2, hflip=True)
    a = augment_batch(x, aug, torch.Generator().manual_seed(5))
    b = augment_batch(x, aug, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for k in range(16):
        windows = [padded[k, :, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(a[k], w) or torch.equal(a[k], w.flip(-1)) for w in windows)
    assert not torch.equal(a, augment_batch(x, aug, torch.Generator().manual_seed(6)))


def test_on_with_a_file_source_is_a_one_line_error_naming_the_field():
    spec = parse_job(job_doc(speed={"dataOnDevice": "on"}, data={"source": "file:///data/pets"})).spec
    folder = Images(ImageSplit(None, torch.zeros(4, dtype=torch.long), folder=object()), np.arange(4), 32, None)
    with pytest.raises(SpecError, match=r"^spec.speed.dataOnDevice: on needs an in-memory source") as err:
        resident_data(Datasets(folder, folder, folder, ("a",)), spec, CPU)
    assert "\n" not in str(err.value)
    auto = parse_job(job_doc(data={"source": "file:///data/pets"})).spec
    data = Datasets(folder, folder, folder, ("a",))
    assert resident_data(data, auto, CPU) is data  # auto on the CPU: the DataLoader path
