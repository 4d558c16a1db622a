"""Images that do not decode (corrupt, truncated, not an image): skipped, counted and named.

A folder dataset's sample that fails to decode is recorded here and the next image of the same
split stands in for it, so a batch keeps its shape and one bad file among a million is not a
crash that a cluster retries to exhaustion. Records go to one append-only file per training
process, so DataLoader workers (other processes) add to it too; ranks are joined at each check.
Above spec.data.maxBadFraction of the job's images the stage ends with one line (exit 2: the
data must be fixed, a retry reads the same files).
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

from thaw_contract.spec import SpecError

SHOWN = 3  # files named in a warning or an error line


class BadImages:
    """The record of one training process (and its DataLoader workers)."""

    def __init__(self, root: Path):
        self.root = root  # names are relative to the source (train/<class>/<file>)
        fd, self.path = tempfile.mkstemp(prefix="thaw-bad-images-", suffix=".tsv")
        os.close(fd)
        self.reported = 0  # how many the log has already warned about (main process)
        atexit.register(lambda: Path(self.path).unlink(missing_ok=True))

    def record(self, path: str, err: Exception) -> None:
        """Called wherever the decode failed (a worker process or the main one). One short
        O_APPEND write per line: lines from several processes do not interleave."""
        # The file is named in the line already: PIL's "cannot identify image file '<path>'" need not repeat it.
        why = (str(err).replace(f" '{path}'", "").splitlines() or [type(err).__name__])[0][:120].replace("\t", " ")
        line = f"{os.path.relpath(path, self.root)}\t{type(err).__name__}: {why}\n"
        with open(self.path, "a") as f:
            f.write(line)

    def seen(self) -> dict[str, str]:
        """file -> why, first reason for each file (a file read twice is one bad image)."""
        out: dict[str, str] = {}
        with open(self.path) as f:
            for line in f:
                name, _, why = line.rstrip("\n").partition("\t")
                out.setdefault(name, why)
        return out


def verdict(bad: dict[str, str], total: int, max_fraction: float) -> str | None:
    """The error line when bad images exceed the allowed fraction of `total`, else None."""
    if not bad or len(bad) <= max_fraction * total:
        return None
    return (
        f"spec.data.maxBadFraction: {len(bad)} of {total} images do not decode ({len(bad) / total:.2%}, "
        f"above {max_fraction:g}); first: {named(bad)}; fix or remove them, or raise maxBadFraction"
    )


def named(bad: dict[str, str]) -> str:
    first = sorted(bad)[:SHOWN]
    more = f" and {len(bad) - len(first)} more" if len(bad) > len(first) else ""
    return ", ".join(f"{n} ({bad[n]})" for n in first) + more


def summary(bad: dict[str, str]) -> dict | None:
    """What a stage's result (and status) says of them."""
    return {"count": len(bad), "first": sorted(bad)[:SHOWN]} if bad else None


def check(bad: BadImages | None, total: int, max_fraction: float, env, warn) -> dict | None:
    """Every rank's records joined (a collective: every rank calls it at the same point): the
    error line above `max_fraction` of `total`, a warning naming the first files when there are
    new ones, and the summary for the stage's result."""
    from trainer.distributed import all_gather_objects

    if bad is None:
        return None
    joined: dict[str, str] = {}
    for part in all_gather_objects(bad.seen(), env):
        for name, why in part.items():
            joined.setdefault(name, why)
    line = verdict(joined, total, max_fraction)
    if line is not None:
        raise SpecError(line)
    if len(joined) > bad.reported:
        bad.reported = len(joined)
        warn(f"warning: data: {len(joined)} of {total} images do not decode; skipped: {named(joined)}")
    return summary(joined)


def no_image_decodes(split: str) -> SpecError:
    return SpecError(f"spec.data.source: no image of the {split} split decodes")
