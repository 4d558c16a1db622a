"""Weights a user brings (spec.model.weightsUri): read from file://, s3:// or https://, as a
safetensors file or a torch state_dict, and fitted to the architecture.

What fits: every key of the model, with its shape. Two differences are forgiven because
they are what pretrained weights always look like: a `module.` prefix (saved from DDP) and
a head of another class count (the new task's head starts fresh, and the message says so).
Anything else is one line naming the field, how many keys are missing and unexpected and the
first few of each, and nothing trains.
"""

from __future__ import annotations

import io
import urllib.request

import torch
from torch import nn

from thaw_contract.spec import SpecError

FIELD = "spec.model.weightsUri"
SHOWN = 3  # key names quoted per kind of mismatch


def read_bytes(uri: str, endpoint: str | None = None, timeout: float = 60.0) -> bytes:
    if uri.startswith("file://"):
        try:
            with open(uri.removeprefix("file://"), "rb") as f:
                return f.read()
        except OSError as err:
            raise SpecError(f"{FIELD}: cannot read {uri}: {err.strerror or err}") from None
    if uri.startswith("s3://"):
        from trainer.storage import s3_client, s3_error, split_s3_uri

        bucket, key = split_s3_uri(uri)
        try:
            return s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:  # noqa: BLE001 - boto3's errors, made one line
            raise SpecError(f"{FIELD}: {s3_error(err, uri, bucket, 'read')}") from None
    if uri.startswith("https://"):
        try:
            with urllib.request.urlopen(uri, timeout=timeout) as resp:  # noqa: S310 - https only
                return resp.read()
        except OSError as err:
            raise SpecError(f"{FIELD}: cannot download {uri}: {getattr(err, 'reason', err)}") from None
    raise SpecError(f"{FIELD}: {uri!r} must start with file://, s3:// or https://")


def parse_state_dict(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """A safetensors file or a torch.save'd state_dict (weights_only: no code runs); a dict
    holding the state_dict under "model" or "state_dict" is unwrapped."""
    if uri.endswith(".safetensors") or _looks_like_safetensors(data):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(data)
        except SafetensorError as err:
            raise SpecError(f"{FIELD}: {uri} is not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors of every kind, made one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecError(f"{FIELD}: {uri} is neither safetensors nor a torch state_dict ({first})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SpecError(f"{FIELD}: {uri} holds a {type(obj).__name__}, not a state_dict of tensors")
    return obj


def _looks_like_safetensors(data: bytes) -> bool:
    # 8 bytes of little-endian header length, then the JSON header.
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data)


def fit(model: nn.Module, state: dict[str, torch.Tensor], head: str, uri: str, architecture: str) -> list[str]:
    """Load `state` into `model`; returns notes on what was forgiven. Raises SpecError otherwise."""
    notes = []
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
        notes.append("removed the 'module.' prefix (weights saved from DDP)")
    own = model.state_dict()
    head_keys = [k for k in own if k.startswith(head + ".") and k in state and state[k].shape != own[k].shape]
    if head_keys:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in head_keys[:SHOWN])
        notes.append(f"kept the new head ({shapes}: another class count)")
        state = {k: v for k, v in state.items() if k not in head_keys}
    missing = [k for k in own if k not in state and not (head_keys and k.startswith(head + "."))]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)):
            if keys:
                more = ", ..." if len(keys) > SHOWN else ""
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:SHOWN])}{more})")
        raise SpecError(f"{FIELD}: {uri} does not fit {architecture}: keys {'; '.join(parts)}")
    model.load_state_dict(state, strict=not head_keys)
    return notes
