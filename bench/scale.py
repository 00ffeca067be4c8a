"""Data-plane scale bench on CPU: the real caption job at growing row counts, the engine a STAND-IN.

What grows with the rows of one job, apart from GPU time: the input scan (ids and duplicates), Ray Data's
execution and checkpoint, the resume after a kill (the committed-row count and the checkpoint filter),
the manifest's exactly-once check, the report. This runs `bench.scale_job` (the real job, only the
engine replaced by pipeline.testing.standin_engine: a fixed answer, no model) over synthetic records
(a small PNG each, 32 px), fresh at every size, then kills one job at --kill-at of its rows and reruns
it. It prints one line per step and size, a fit of each step's time and the driver's peak memory
against rows (cost = a + b * rows, and the log-log slope: 1 is linear), and writes everything to --json.

    python -m bench.scale --rows 100000,300000,1000000 --json docs/bench-results/cpu-scale.json

The host is named in the result (CPUs, memory); a stand-in engine runs unpaced unless
--standin-rows-per-s is set, so the time is the data plane's own.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
STEPS = ("committed_rows", "plan", "build", "write", "manifest", "report")


def small_png(seed: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (32, 32), ((seed * 37) % 256, (seed * 91) % 256, 120))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_records(directory: Path, rows: int, rows_per_file: int) -> float:
    """`rows` records in files of `rows_per_file`: distinct ids, one of 16 small PNGs each, a prompt."""
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    images = [small_png(i) for i in range(16)]
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string())])
    for part, first in enumerate(range(0, rows, rows_per_file)):
        count = min(rows_per_file, rows - first)
        table = pa.table({"id": [f"rec-{first + i:010d}" for i in range(count)],
                          "image": [images[(first + i) % 16] for i in range(count)],
                          "prompt": ["Describe the image."] * count}, schema=schema)
        pq.write_table(table, directory / f"part-{part:05d}.parquet")
    return time.perf_counter() - started


def job_command(input_dir: Path, output_dir: Path, result: Path, model: Path, args) -> list[str]:
    overrides = [f"model.source={model}", "images.target_size_px=32", f"batch.rows_per_file={args.rows_per_file}",
                 f"batch.rows_per_block={args.rows_per_block}", f"batch.prepare_batch_size={args.prepare_batch}",
                 "report.gallery_size=16", *args.set]
    command = [sys.executable, "-m", "bench.scale_job", "--input", str(input_dir), "--output", str(output_dir),
               "--config", str(CONFIG), "--result", str(result),
               "--standin-rows-per-s", str(args.standin_rows_per_s), "--standin-replicas", str(args.standin_replicas)]
    for override in overrides:
        command += ["--set", override]
    return command


def start_job(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **OFFLINE}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the job's process group, then whatever of its tree (Ray's processes) lives on, by PID."""
    import psutil

    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def committed_rows(output_dir: Path) -> int:
    checkpoint = output_dir / "_checkpoint"
    files = [str(p) for p in checkpoint.glob("*.parquet")] if checkpoint.exists() else []
    try:
        return pads.dataset(files, format="parquet").count_rows() if files else 0
    except (OSError, pa.ArrowInvalid):   # a file being written
        return -1


def run_job(command: list[str], log: Path, result: Path, timeout_s: float) -> dict[str, Any]:
    process = start_job(command, log)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        raise SystemExit(f"job did not finish in {timeout_s}s; log: {log}")
    if code != 0 or not result.exists():
        raise SystemExit(f"job exited {code}; log: {log}\n" + log.read_text()[-4000:])
    return json.loads(result.read_text())


def kill_and_resume(input_dir: Path, work: Path, rows: int, model: Path, args) -> dict[str, Any]:
    """One job SIGKILLed once --kill-at of its rows are committed, then the same command to the end."""
    output = work / f"out-{rows}-killed"
    shutil.rmtree(output, ignore_errors=True)
    first = start_job(job_command(input_dir, output, work / "killed.json", model, args), work / f"killed-{rows}.log")
    deadline = time.monotonic() + args.timeout_s
    while committed_rows(output) < args.kill_at * rows:
        if first.poll() is not None:
            raise SystemExit(f"the job to kill exited first ({first.returncode}); log: {work}/killed-{rows}.log")
        if time.monotonic() > deadline:
            kill_tree(first)
            raise SystemExit("no kill point reached")
        time.sleep(0.5)
    kill_tree(first)
    at_kill = committed_rows(output)
    resumed = run_job(job_command(input_dir, output, work / "resumed.json", model, args), work / f"resumed-{rows}.log",
                      work / "resumed.json", args.timeout_s)
    return {"rows": rows, "committed_at_kill": at_kill, **resumed}


def fit(points: list[tuple[int, float]]) -> Optional[dict[str, float]]:
    """Least squares cost = a + b * rows, and the log-log slope between the smallest and largest size."""
    points = [(x, y) for x, y in points if y is not None]
    if len(points) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    (x0, y0), (x1, y1) = min(points), max(points)
    slope = math.log(y1 / y0) / math.log(x1 / x0) if y0 > 0 and y1 > 0 and x1 != x0 else None
    return {"a": round(my - b * mx, 4), "b_per_million": round(b * 1e6, 4),
            "loglog_slope": round(slope, 3) if slope is not None else None}


def host() -> dict[str, Any]:
    memory = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpus": os.cpu_count(), "memory_gib": round(memory / 2**20, 1), "python": platform.python_version(),
            "machine": platform.processor() or platform.machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,300000,1000000", help="comma-separated row counts")
    parser.add_argument("--work", default="/tmp/scale-bench", help="scratch directory (records, outputs, logs)")
    parser.add_argument("--model", help="tiny Gemma 3 checkpoint dir (built there when missing)")
    parser.add_argument("--input-rows-per-file", type=int, default=100_000)
    parser.add_argument("--rows-per-file", type=int, default=100_000, help="output rows per file")
    parser.add_argument("--rows-per-block", type=int, default=10_000)
    parser.add_argument("--prepare-batch", type=int, default=1000)
    parser.add_argument("--standin-rows-per-s", type=float, default=0.0)
    parser.add_argument("--standin-replicas", type=int, default=1)
    parser.add_argument("--kill-at", type=float, default=0.5, help="kill-and-resume at the largest size (0: none)")
    parser.add_argument("--set", action="append", default=[], help="further config overrides for every job")
    parser.add_argument("--timeout-s", type=float, default=7200)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    sizes = [int(value) for value in args.rows.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / "tiny-gemma3"
    if not (model / "config.json").exists():
        from pipeline.testing.tiny_gemma3 import build_gemma3

        build_gemma3(model)

    runs = []
    for rows in sizes:
        input_dir = work / f"in-{rows}"
        if not input_dir.exists():
            print(f"writing {rows} records: {write_records(input_dir, rows, args.input_rows_per_file):.1f}s", flush=True)
        output = work / f"out-{rows}"
        shutil.rmtree(output, ignore_errors=True)
        result = run_job(job_command(input_dir, output, work / "result.json", model, args), work / f"job-{rows}.log",
                         work / "result.json", args.timeout_s)
        runs.append({"rows": rows, **result})
        steps = " ".join(f"{name} {result['steps'][name]['wall_s']:.1f}s" for name in STEPS if name in result["steps"])
        print(f"{rows:>10} rows: wall {result['wall_s']:.1f}s ({rows / result['wall_s']:.0f} rows/s), driver peak "
              f"{result['driver']['peak_rss_mib']:.0f} MiB, object store peak {result['object_store_peak_mib']} MiB; "
              f"{steps}; {result['status']}", flush=True)
    resumed = None
    if args.kill_at > 0:
        resumed = kill_and_resume(work / f"in-{sizes[-1]}", work, sizes[-1], model, args)
        print(f"kill at {resumed['committed_at_kill']} of {sizes[-1]} rows, resume: wall {resumed['wall_s']:.1f}s, "
              f"committed_rows {resumed['steps']['committed_rows']['wall_s']:.1f}s, write "
              f"{resumed['steps']['write']['wall_s']:.1f}s, driver peak {resumed['driver']['peak_rss_mib']:.0f} MiB, "
              f"{resumed['status']}, resume {resumed['resume']}", flush=True)
    fits = {name: fit([(r["rows"], r["steps"].get(name, {}).get("wall_s")) for r in runs]) for name in STEPS}
    fits["wall_s"] = fit([(r["rows"], r["wall_s"]) for r in runs])
    fits["driver_peak_mib"] = fit([(r["rows"], r["driver"]["peak_rss_mib"]) for r in runs])
    for name, value in fits.items():
        print(f"fit {name:>16}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host(), "args": vars(args), "runs": runs,
                                               "kill_and_resume": resumed, "fits": fits}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
