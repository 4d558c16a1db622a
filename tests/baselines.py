"""Non-neural baselines shared by the e2e quality test and benchmarks/quality_table.py."""

from __future__ import annotations

import numpy as np

from thaw_contract.spec import parse_job
from trainer.data import build_datasets, load_source, split_train_val

FOLDER_PIXELS = 32  # image folders hold photos of any size: logistic regression sees them at 32 px


def raw_pixels(doc: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y) in [0, 1]: exactly the job's training subset and test
    images; in-memory sources at their own size, image folders decoded and resized to 32 px."""
    spec = parse_job(doc).spec
    n_test = spec.data.test_limit
    src = load_source(spec.data)
    if src.train.images is not None:
        train_idx, _ = split_train_val(src.train.labels, spec.data, spec.seed)
        x = src.train.images[train_idx].reshape(len(train_idx), -1).numpy() / 255.0
        xt = src.test.images[:n_test].reshape(len(src.test.images[:n_test]), -1).numpy() / 255.0
        return x, src.train.labels[train_idx].numpy(), xt, src.test.labels[:n_test].numpy()
    data = build_datasets(spec.data.model_copy(update={"image_size": FOLDER_PIXELS}), spec.model.num_classes, spec.seed)

    def pixels(ds) -> tuple[np.ndarray, np.ndarray]:
        items = [ds[i] for i in range(len(ds))]
        return np.stack([x.reshape(-1).numpy() / 255.0 for x, _ in items]), np.array([y for _, y in items])

    return (*pixels(data.train), *pixels(data.test))


def logistic_regression_accuracy(doc: dict) -> float:
    """Logistic regression on raw pixels of exactly the job's training subset and test images."""
    from sklearn.linear_model import LogisticRegression

    x, y, xt, yt = raw_pixels(doc)
    clf = LogisticRegression(max_iter=2000).fit(x, y)
    return float(np.mean(clf.predict(xt) == yt))
