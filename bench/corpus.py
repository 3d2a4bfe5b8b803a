"""The benchmark corpora, generated once into build/bench-corpus/ and reused by later runs.

Generating 2000 CT and MR images of 512x512 takes longer than most scenarios, so a corpus is
kept in a folder named after its shape, with a manifest written last: a folder without its
manifest (an interrupted generation) is generated again.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.corpus import CorpusFile, plan_corpus

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "bench-corpus"
_MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Corpus:
    """Files on disk, in study order, with what the scenarios need to know about them."""

    directory: Path
    paths: tuple[Path, ...]
    sop_uids: tuple[str, ...]
    study_uids: tuple[str, ...]
    series_count: int
    total_bytes: int
    rows: int
    columns: int

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def megabytes(self) -> float:
        return self.total_bytes / 1e6

    @property
    def instance_bytes(self) -> int:
        return self.total_bytes // max(1, len(self))

    def describe(self) -> str:
        return (
            f"{len(self)} instances of {self.columns}x{self.rows} 16-bit CT/MR in"
            f" {len(self.study_uids)} studies, {self.series_count} series ({self.megabytes:.0f} MB)"
        )


def shape(count: int) -> tuple[int, int, int]:
    """(studies, series per study, instances per series) covering `count` instances.

    Large corpora look like real CT and MR studies (5 series of 50 images); small ones still
    have several studies and series so that batches mix them.
    """
    series = 5 if count >= 200 else 2
    per_series = 50 if count >= 500 else max(1, count // (2 * series))
    studies = max(1, math.ceil(count / (series * per_series)))
    return studies, series, per_series


def ensure(
    count: int, *, size: int, columns: int | None = None, seed: int = 0, cache: Path = CACHE
) -> Corpus:
    """The corpus of `count` instances of `size` rows and `columns` (default: `size`) pixels,
    generated if not cached yet."""
    columns = columns or size
    studies, series, per_series = shape(count)
    name = f"{size}px" if columns == size else f"{size}x{columns}px"
    directory = cache / f"ctmr-{name}-{count}-seed{seed}"
    manifest = directory / _MANIFEST
    if manifest.is_file():
        cached = json.loads(manifest.read_text())
        if cached.get("version") == _MANIFEST_VERSION:
            return _from_manifest(directory, cached)
    shutil.rmtree(directory, ignore_errors=True)
    plan = plan_corpus(
        directory,
        studies=studies,
        series_per_study=series,
        instances_per_series=per_series,
        rows=size,
        columns=columns,
        seed=seed,
    )[:count]
    print(
        f"generating {count} instances of {columns}x{size} into {directory} (once)",
        file=sys.stderr,
        flush=True,
    )
    # pydicom is pure Python: spread the writing over the cores.
    with ProcessPoolExecutor() as pool:
        list(pool.map(CorpusFile.write, plan, chunksize=64))
    document: dict[str, Any] = {
        "version": _MANIFEST_VERSION,
        "rows": size,
        "columns": columns,
        "files": [str(item.path.relative_to(directory)) for item in plan],
        "sop_uids": [item.sop_uid for item in plan],
        "study_uids": list(dict.fromkeys(item.study_uid for item in plan)),
        "series_count": len({item.series_uid for item in plan}),
        "total_bytes": sum(item.path.stat().st_size for item in plan),
    }
    manifest.write_text(json.dumps(document))
    return _from_manifest(directory, document)


def _from_manifest(directory: Path, document: dict[str, Any]) -> Corpus:
    return Corpus(
        directory=directory,
        paths=tuple(directory / str(name) for name in document["files"]),
        sop_uids=tuple(str(uid) for uid in document["sop_uids"]),
        study_uids=tuple(str(uid) for uid in document["study_uids"]),
        series_count=int(document["series_count"]),
        total_bytes=int(document["total_bytes"]),
        rows=int(document["rows"]),
        columns=int(document.get("columns", document["rows"])),
    )
