"""What every part of the spec shares: the API's names and constants, SpecError, the model
base (camelCase in YAML, snake_case in Python, unknown fields refused, frozen), and the URL and
bucket patterns the CRD carries too. Part of thaw_contract.spec, which is what callers import.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_VERSION = "thaw.dev/v1alpha1"
KIND = "FineTuneJob"
NAMED_DATASETS = ("fashion-mnist", "digits")


class SpecError(ValueError):
    """A user-caused problem with a FineTuneJob; each line names the field."""


# The exit code of a process that found a SpecError: retrying cannot help (the stage Job's
# podFailurePolicy fails at once on it).
EXIT_CONFIG_ERROR = 2
# How a stage that failed its gate (gate.onRegression: fail) begins its one-line reason.
GATE_FAILED = "stage gate:"


class SpecModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]


# An S3 endpoint is a URL with a scheme: botocore raises a bare ValueError for "host:8333".
ENDPOINT_PATTERN = r"^https?://[^\s/?#]+(/[^\s]*)?$"
# Object names: stage Services are <name>-<k> and must be DNS-1035 labels (start with a letter).
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# S3's bucket naming rules (3-63 of a-z 0-9 . -), and the URIs built on them; the CRD carries
# the same patterns (thaw_operator.crd), so the API server refuses what the models refuse.
BUCKET_PATTERN = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
CHECKPOINT_URI_PATTERN = rf"^(s3://{BUCKET_PATTERN}(/.*)?|file://.+)$"
DATA_SOURCE_PATTERN = rf"^({'|'.join(NAMED_DATASETS)}|file:///.+|s3://{BUCKET_PATTERN}(/.*)?)$"


def check_endpoint(v: str | None) -> str | None:
    if v is not None and not re.fullmatch(ENDPOINT_PATTERN, v):
        raise ValueError(f"must be a URL with its scheme, e.g. http://seaweedfs:8333 (got {v!r})")
    return v


def bucket_of(uri: str) -> str:
    """The bucket of an s3:// URI, checked against S3's naming rules."""
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    if not re.fullmatch(BUCKET_PATTERN, bucket):
        raise ValueError(f"{uri!r} does not name a valid S3 bucket (3-63 of a-z 0-9 . -)")
    return bucket
