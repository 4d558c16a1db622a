"""Non-neural baselines shared by the e2e quality test and benchmarks/quality_table.py."""

from __future__ import annotations

import numpy as np

from trainer.data import load_source, split_train_val
from trainer.spec import parse_job


def logistic_regression_accuracy(doc: dict) -> float:
    """Logistic regression on raw pixels of exactly the job's training subset and test images."""
    from sklearn.linear_model import LogisticRegression

    spec = parse_job(doc).spec
    src = load_source(spec.data)
    train_idx, _ = split_train_val(src.train.labels, spec.data, spec.seed)
    x = src.train.images[train_idx].reshape(len(train_idx), -1).numpy() / 255.0
    n_test = spec.data.test_limit
    xt = src.test.images[:n_test].reshape(n_test, -1).numpy() / 255.0
    clf = LogisticRegression(max_iter=2000).fit(x, src.train.labels[train_idx].numpy())
    return float(np.mean(clf.predict(xt) == src.test.labels[:n_test].numpy()))
