"""The job-level benchmark's datasets: W1 and W2 records as parquet shards, written in parallel.

    python -m bench.job_data DIR --w1 10000 --w2 2000 [--workers 16]

DIR/w1/part-NNNNN.parquet: W1 records (id, a distinct 896 px JPEG, the W1 prompt), 500 rows a file.
DIR/w2/part-NNNNN.parquet: W2 records (id, a distinct 4032x3024 q90 camera JPEG of ~2.1 MB, the W1 prompt),
50 rows (~105 MB) a file. DIR/dataset.json: rows, bytes and the seconds the writing took.

One process per shard (`--workers`, the card's 16 CPUs): each makes its images and writes its own file, so
no image crosses a pipe. Writing happens before any timed window (bench/job_run.py starts its clock when
it starts a job), and a dataset already there with the asked row counts is reused.
CPU check: python -m bench.job_data /tmp/jobdata --w1 40 --w2 8 --workers 2
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.common import W1_PROMPT, camera_image_bytes, w1_image_bytes

ROWS_PER_FILE = {"w1": 500, "w2": 50}
# Rows per row group: Ray Data reads a row group at a time; W2's rows are ~2 MB each.
ROW_GROUP = {"w1": 64, "w2": 8}


def shard_ranges(count: int, per_file: int) -> list[tuple[int, int]]:
    """[start, stop) of each file's rows."""
    return [(start, min(start + per_file, count)) for start in range(0, count, per_file)]


def write_shard(workload: str, directory: str, start: int, stop: int) -> int:
    """One file of rows start..stop-1 of a workload; returns its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    make = w1_image_bytes if workload == "w1" else camera_image_bytes
    blobs = [make(i) for i in range(start, stop)]
    table = pa.table({"id": [f"{workload}-{i:06d}" for i in range(start, stop)],
                      "image": pa.array(blobs, type=pa.binary()),
                      "prompt": [W1_PROMPT] * (stop - start)})
    path = Path(directory) / f"part-{start // ROWS_PER_FILE[workload]:05d}.parquet"
    pq.write_table(table, path, row_group_size=ROW_GROUP[workload], compression="none")
    return path.stat().st_size


def write_workload(root: Path, workload: str, count: int, workers: int) -> dict:
    directory = root / workload
    meta_path = root / f"{workload}.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("rows") == count:
        return {**json.loads(meta_path.read_text()), "reused": True}
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.parquet"):
        stale.unlink()
    started = time.perf_counter()
    ranges = shard_ranges(count, ROWS_PER_FILE[workload])
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(write_shard, [workload] * len(ranges), [str(directory)] * len(ranges),
                              [a for a, _ in ranges], [b for _, b in ranges]))
    meta = {"workload": workload.upper(), "rows": count, "files": len(ranges), "bytes": sum(sizes),
            "write_s": round(time.perf_counter() - started, 1), "workers": workers, "path": str(directory)}
    meta_path.write_text(json.dumps(meta))
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--w1", type=int, default=10_000)
    parser.add_argument("--w2", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    metas = [write_workload(root, w, n, args.workers) for w, n in (("w1", args.w1), ("w2", args.w2)) if n]
    (root / "dataset.json").write_text(json.dumps(metas, indent=1))
    for meta in metas:
        print(f"DATASET {json.dumps(meta)}", flush=True)


if __name__ == "__main__":
    main()
