"""Scheduled captioning at scale: one tick over N new input files, then an idle tick, on a real S3 server.

The tick is `pipeline.ops.schedule.run_tick`, unchanged: it lists the input prefix, reads the ledger's done
set, claims every new file (a LIST and a conditional PUT per file), writes the run record and input list,
runs the runner, and marks every file done (a PUT per file). The runner is a STAND-IN that captions
nothing (the caption job's own scale is bench/scale.py's); so is the input, objects of one byte named
*.parquet, which only the job would open. The S3 server is the tests' (SeaweedFS), on this machine.

    python -m bench.scale_schedule --files 1000,10000,100000 --json docs/bench-results/cpu-scale-schedule.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from bench.scale import fit, host
from bench.scale_job import memory_mib


class StandInRunner:
    """Captions nothing: the tick's own costs (listing, claims, done markers) are what is measured."""

    mode = "bench-stand-in"

    def run(self, run, on_submitted: Callable[[dict[str, str]], None]) -> dict[str, Any]:
        return {"files": len(run.files)}


def upload_inputs(client, bucket: str, prefix: str, count: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"{prefix}/part-{i:07d}.parquet", Body=b"x"),
                      range(count)))
    return time.perf_counter() - started


def measure(storage, client, files: int) -> dict[str, Any]:
    from pipeline.ops.schedule import TickRequest, run_tick

    prefix = f"in-{files}"
    upload_s = upload_inputs(client, "data", prefix, files)
    request = TickRequest(input_uri=f"s3://data/{prefix}", output_uri=f"s3://data/out-{files}", storage=storage)
    result: dict[str, Any] = {"files": files, "upload_s": round(upload_s, 2)}
    for name in ("first_tick", "idle_tick"):
        before = memory_mib()["rss_mib"]
        started = time.perf_counter()
        tick = run_tick(request, StandInRunner())
        result[name] = {"wall_s": round(time.perf_counter() - started, 2), "status": tick.status,
                        "listed": tick.listed, "claimed": tick.claimed, "rss_growth_mib": round(
                            memory_mib()["rss_mib"] - before, 1), "peak_rss_mib": round(memory_mib()["peak_rss_mib"], 1)}
    assert result["first_tick"]["claimed"] == files and result["idle_tick"]["status"] == "idle", result
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_schedule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="1000,10000,100000")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from pipeline.config import PipelineConfig
    from pipeline.testing.s3_server import S3Server

    runs = []
    with tempfile.TemporaryDirectory(prefix="scale-schedule-") as scratch, S3Server(Path(scratch)) as s3:
        s3.create_bucket("data")
        storage = PipelineConfig.load(environ=s3.env()).storage
        import os

        os.environ.update(s3.env())   # boto3's credentials
        from pipeline.io.storage import make_s3_client

        client = make_s3_client(storage)
        for files in [int(v) for v in args.files.split(",")]:
            run = measure(storage, client, files)
            runs.append(run)
            print(f"{files:>8} files: upload {run['upload_s']:.1f}s; first tick {run['first_tick']['wall_s']:.1f}s "
                  f"({files / run['first_tick']['wall_s']:.0f} files/s); idle tick {run['idle_tick']['wall_s']:.2f}s; "
                  f"driver peak {run['idle_tick']['peak_rss_mib']:.0f} MiB", flush=True)
    fits = {name: fit([(r["files"], r[name]["wall_s"]) for r in runs]) for name in ("first_tick", "idle_tick")}
    for name, value in fits.items():
        print(f"fit {name}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host(), "runs": runs, "fits": fits}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
