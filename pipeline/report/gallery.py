"""Which rows get a thumbnail, and which the report's gallery shows: one seeded hash, two ends.

The gallery's sample is fixed by a seed: each row's key is a 64-bit mix of its `row_hash` (Ray's hash of
the input file's path and the row's position, stable across reruns) and `report.gallery_seed`, and the
gallery shows the answered rows with the smallest keys. The report is built after the run, from the
output; the thumbnails must be made during it, on the CPU workers that already hold the decoded image
(never a second fetch), by workers that do not know the job's size or what the others saw.

`ThumbnailSampler` solves that with a bottom-k sketch per worker: a worker makes a thumbnail for a
decoded row when its key is among the k smallest keys that worker has seen so far. A row among the k
smallest keys of the whole job is among the k smallest of any part of it, so it always gets one, in any
split of rows over workers, with restarts or resumed runs. The cost is about k x (1 + ln(n / k)) thumbnails
for a worker that sees n rows: with k = 96 and 125,000 rows per worker, ~800 thumbnails, ~3 MB, against
~500 MB for a thumbnail on every row.
"""
from __future__ import annotations

import hashlib
import heapq
from typing import Optional, Sequence

import numpy as np

# Thumbnails kept per worker, per gallery row: room for the answered sample when up to 3 in 4 decoded
# rows fail in the engine.
OVERSAMPLE = 4

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def sample_keys(row_hashes: Sequence[Optional[int]], ids: Sequence[Optional[str]], seed: int) -> list[Optional[int]]:
    """Each row's 64-bit sample key (splitmix64 of row_hash + seed); from the id where a row has no
    row_hash (outputs of direct library calls); None for a row with neither."""
    base = []
    for row_hash, record_id in zip(row_hashes, ids):
        if row_hash is not None:
            base.append(int(row_hash))
        elif record_id is not None:
            base.append(int.from_bytes(hashlib.blake2b(str(record_id).encode(), digest_size=8).digest(), "big"))
        else:
            base.append(None)
    known = np.array([b for b in base if b is not None], dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = known + np.uint64(seed) * _GOLDEN + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    mixed = iter(int(v) for v in z)
    return [None if b is None else next(mixed) for b in base]


class ThumbnailSampler:
    """Bottom-k sketch over sample keys: `take(key)` is True when the key is among the k smallest seen."""

    def __init__(self, k: int):
        self.k = k
        self._largest_first: list[int] = []  # negated keys: heap[0] is minus the largest kept key

    def take(self, key: Optional[int]) -> bool:
        if self.k <= 0 or key is None:
            return False
        if len(self._largest_first) < self.k:
            heapq.heappush(self._largest_first, -key)
            return True
        if key < -self._largest_first[0]:
            heapq.heapreplace(self._largest_first, -key)
            return True
        return False


def sampler_size(gallery_size: int) -> int:
    return OVERSAMPLE * gallery_size
