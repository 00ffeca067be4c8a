"""One caption job of the data-plane scale bench: the real job with a STAND-IN engine, every step timed.

Run by bench/scale.py as its own process (so that its peak memory is the driver's alone):

    python -m bench.scale_job --input DIR --output DIR --config configs/tiny-cpu.yaml --result r.json \
        [--set FIELD=VALUE ...] [--standin-rows-per-s 0] [--standin-replicas 1]

The job is `pipeline.batch.skeleton.run_batch` with `CaptionFormat`, unchanged, except that the engine
processor is pipeline.testing.standin_engine's (a fixed answer, no model). Each step the skeleton calls on
the format is timed with the driver's resident and peak memory after it, and a thread samples Ray's
object store every few seconds once Ray is up.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.batch.caption import CaptionFormat
from pipeline.config import PipelineConfig

STEPS = ("committed_rows", "plan", "build", "write", "manifest", "report")


def memory_mib() -> dict[str, float]:
    """This process's resident (VmRSS) and peak resident (VmHWM) memory."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, kib = line.split()[:2]
                values[name[:-1]] = int(kib) / 1024
    return {"rss_mib": values["VmRSS"], "peak_rss_mib": values["VmHWM"]}


class ObjectStoreSampler(threading.Thread):
    """Ray's plasma store use, sampled from the raylet's memory summary while the job runs."""

    PATTERN = re.compile(r"Plasma memory usage (\d+) MiB, (\d+) objects")

    def __init__(self, interval_s: float = 3.0):
        super().__init__(daemon=True)
        self.interval_s, self.samples, self.stopped = interval_s, [], threading.Event()

    def run(self) -> None:
        import ray
        from ray._private.internal_api import memory_summary

        while not self.stopped.wait(self.interval_s):
            if not ray.is_initialized():
                continue
            try:
                # The address, or it refuses when other Ray instances run on the machine.
                address = ray.get_runtime_context().gcs_address
                match = self.PATTERN.search(memory_summary(address=address, stats_only=True))
            except Exception:   # the cluster is going down with the job
                continue
            if match:
                self.samples.append({"t": time.time(), "mib": int(match.group(1)), "objects": int(match.group(2))})


@dataclass
class TimedCaptionFormat(CaptionFormat):
    """CaptionFormat whose every step records its wall time and the driver's memory after it."""

    steps: dict[str, Any] = field(default_factory=dict)

    def _timed(self, name: str, call, *args):
        started = time.perf_counter()
        result = call(*args)
        self.steps[name] = {"wall_s": round(time.perf_counter() - started, 3), **memory_mib()}
        return result

    def committed_rows(self, output):
        return self._timed("committed_rows", super().committed_rows, output)

    def plan(self, config):
        return self._timed("plan", super().plan, config)

    def build(self, config, plan, model, guard, output):
        return self._timed("build", super().build, config, plan, model, guard, output)

    def write(self, config, dataset, output, attempt):
        return self._timed("write", super().write, config, dataset, output, attempt)

    def manifest(self, config, plan, model, output, started, finished):
        return self._timed("manifest", super().manifest, config, plan, model, output, started, finished)

    def report(self, config, output_uri, manifest):
        return self._timed("report", super().report, config, output_uri, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--result", required=True, help="JSON file for the step timings")
    parser.add_argument("--standin-rows-per-s", type=float, default=0.0, help="per replica; 0 is unpaced")
    parser.add_argument("--standin-replicas", type=int, default=1)
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.batch.skeleton import run_batch
    from pipeline.testing.standin_engine import standin_processor

    config = PipelineConfig.load(args.config, args.overrides)
    job = TimedCaptionFormat(args.input, engine_processor=standin_processor(args.standin_rows_per_s,
                                                                             args.standin_replicas))
    sampler = ObjectStoreSampler()
    sampler.start()
    started = time.perf_counter()
    manifest = run_batch(config, job, args.output)
    wall_s = time.perf_counter() - started
    sampler.stopped.set()
    result = {"wall_s": round(wall_s, 3), "steps": job.steps, "driver": memory_mib(),
              "object_store_peak_mib": max((s["mib"] for s in sampler.samples), default=None),
              "object_store_samples": len(sampler.samples), "status": manifest["status"],
              "counts": manifest["counts"], "resume": manifest["resume"],
              "attempts": [{k: a.get(k) for k in ("attempt", "mode", "status", "rows_done_before", "rows_written",
                                                   "wall_s")} for a in manifest["attempts"]]}
    with open(args.result, "w") as out:
        json.dump(result, out, indent=1)
    return 0 if manifest["status"] == "complete" else 3


if __name__ == "__main__":
    sys.exit(main())
