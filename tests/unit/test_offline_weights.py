"""torchvision weights by enum name: a wrong name lists the valid ones; no network says so in one line."""

from __future__ import annotations

import urllib.request

import pytest

from thaw_contract.spec import ModelSpec, SpecError
from trainer.models import build_model


def test_unknown_weights_name_lists_valid_names():
    with pytest.raises(
        SpecError,
        match=r"spec.model.weights: 'IMAGENET1K_V9' is not a weights name of resnet18; "
        r"valid: DEFAULT, IMAGENET1K_V1",
    ):
        build_model(ModelSpec(architecture="resnet18", weights="IMAGENET1K_V9", num_classes=3), device="meta")


def test_offline_download_fails_with_one_line_pointing_at_offline_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    # A real download attempt through a proxy that refuses connections: offline, for real.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen caches its opener (with these proxies) on first use: keep that cache test-local.
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(SpecError) as err:
        build_model(ModelSpec(architecture="resnet18", weights="IMAGENET1K_V1", num_classes=3))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("spec.model.weights: cannot download IMAGENET1K_V1 for resnet18")
    assert "efficientnet_lite0 with weights BUNDLED" in msg and "TORCH_HOME" in msg
