"""GPU throughput benchmark: plain vLLM vs our pipeline, FP8 vs BF16, workload W1 and text-only, one card.

    python -m bench.gpu_throughput --workdir /tmp/bench --results OUT/results.json \
        [--runs plain-fp8,pipeline-fp8,...] [--shape 12b|tiny]
    python -m bench.gpu_throughput ... --runs "pipeline-fp8,pipeline-bf16|pipeline-fp8+kv-fp8+seqs512|..."

A run is a named configuration (RUNS) plus any knobs (KNOBS) joined with "+". On a machine of several
GPUs, "|" splits the runs into lanes, one GPU each, that run side by side: one lease then measures
several single-GPU configurations at a time. Each lane reads its queue from a file, so runs can be
added while the orchestrator works (`bench/gpu_session.sh queue LANE RUN,...`).

It builds the random-weight checkpoints itself (exact Gemma-3-12b-it shapes, bf16, and FP8-dynamic from
it), measures the card's matmul and memory ceilings, times the front-end's per-image work, then runs
each configuration in its own process (one engine at a time on the card) and appends every result to
the results file as soon as it exists. `bench.render_performance` turns the file into
docs/performance.md. With `--shape tiny --device cpu` it checks the whole path on a CPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import RESULT_PREFIX, write_w1_parquet
from bench.render_layouts import layout_of

NODE_CPUS = ["--set", "runtime.local_num_cpus=48", "--set", "batch.prepare_replicas=[4,12]"]
# vLLM (0.26) fuses TP all-reduce with RMSNorm through FlashInfer's MNNVL backend, which allocates NVLink
# multicast memory: forbidden on the lent hosts (library device/KINDS.md), and on them it failed with an
# illegal memory access during start-up (docs/performance.md, "TP=4 vs 4 x TP=1"). Fusion off; vLLM's own
# custom all-reduce (CUDA IPC, no multicast) stays on. The `-nccl` variants also turn that off, as the
# fallback should it fail too.
NO_FUSION = "{compilation_config: {pass_config: {fuse_allreduce_rms: false}}}"
NO_FUSION_NCCL = "{compilation_config: {pass_config: {fuse_allreduce_rms: false}}, disable_custom_all_reduce: true}"
ONLINE = ["--duration-s", "15"]


def _tp(size: int, extra: str = NO_FUSION) -> list[str]:
    """Engine overrides of a TP=`size` run; batch and online take the same ones (one config)."""
    return ["--set", f"engine.tensor_parallel_size={size}", "--set", f"engine.extra_engine_kwargs={extra}"]


PROFILE_N = 256  # requests the engine-* runs profile: one wave at max_num_seqs 256
RUNS = {
    "plain-fp8": ("plain", "fp8", ["--profile-dir", "{workdir}/profile-plain-fp8"]),
    "plain-bf16": ("plain", "bf16", []),
    "pipeline-fp8": ("pipeline", "fp8", []),
    # The pipeline's engine alone: plain vLLM `LLM.chat` with our Gemma 3 variant and vLLM patch, every
    # request handed over at once. Its rate is what the card gives the pipeline's engine, and its
    # profile, a whole wave of 256 at the pipeline's settings, where that engine's GPU time goes.
    "engine-fp8": ("plain", "fp8", ["--fast-images", "--range-cache", "--text-n", "0",
                                    "--profile-dir", "{workdir}/profile-engine-fp8", "--profile-n", str(PROFILE_N)]),
    "engine-bf16": ("plain", "bf16", ["--fast-images", "--range-cache", "--text-n", "0",
                                      "--profile-dir", "{workdir}/profile-engine-bf16", "--profile-n", str(PROFILE_N)]),
    "pipeline-bf16": ("pipeline", "bf16", []),
    # Ablations: where does the gain come from?
    "pipeline-fp8-stock-images": ("pipeline", "fp8", ["--set", "engine.normalize_images_on_device=false"]),
    "plain-fp8-fast-images": ("plain", "fp8", ["--fast-images"]),
    # Engine layout on one multi-GPU node (issue tp4): one TP=N engine vs N replicas of TP=1, the same
    # CPUs for both (48 for Ray, up to 12 preparation replicas) so only the layout differs.
    "pipeline-fp8-tp4": ("pipeline", "fp8", [*_tp(4), *NODE_CPUS]),
    "pipeline-fp8-tp4-nccl": ("pipeline", "fp8", [*_tp(4, NO_FUSION_NCCL), *NODE_CPUS]),
    "pipeline-fp8-4x1": ("pipeline", "fp8", ["--set", "batch.engine_replicas=4", *NODE_CPUS]),
    "online-fp8-tp4": ("online", "fp8", ["--layout", "tp4", *_tp(4), *ONLINE]),
    "online-fp8-tp4-nccl": ("online", "fp8", ["--layout", "tp4", *_tp(4, NO_FUSION_NCCL), *ONLINE]),
    # The 2-GPU subset of the same four servers comes at no extra start-up.
    "online-fp8-4x1": ("online", "fp8", ["--layout", "4x1", "--subsets", "2", *ONLINE]),
    "pipeline-fp8-tp2": ("pipeline", "fp8", [*_tp(2), *NODE_CPUS]),
    "pipeline-fp8-tp2-nccl": ("pipeline", "fp8", [*_tp(2, NO_FUSION_NCCL), *NODE_CPUS]),
    "pipeline-fp8-2x1": ("pipeline", "fp8", ["--set", "batch.engine_replicas=2", *NODE_CPUS]),
    "online-fp8-tp2": ("online", "fp8", ["--layout", "tp2", *_tp(2), *ONLINE]),
    "online-fp8-tp2-nccl": ("online", "fp8", ["--layout", "tp2", *_tp(2, NO_FUSION_NCCL), *ONLINE]),
    "online-fp8-2x1": ("online", "fp8", ["--layout", "2x1", *ONLINE]),
    # The same driver on one GPU or a CPU machine (smoke test of the online runner).
    "online-fp8-1x1": ("online", "fp8", ["--layout", "1x1"]),
}
# Knobs a run adds with "+" (pipeline-fp8+kv-fp8+seqs512): the pipeline's config overrides and, where the
# knob is an engine argument, the same argument for plain vLLM, so a comparison stays like for like.
KNOBS = {
    # Halves the bytes the decoder attention reads (25% of GPU time) and doubles the KV capacity.
    "kv-fp8": (["engine.kv_cache_dtype=fp8"], ['kv_cache_dtype="fp8"']),
    "seqs512": (["engine.max_num_seqs=512", "batch.max_concurrent_batches=12"], ["max_num_seqs=512"]),
    # Two replicas on the one GPU (engine.gpu_share 0.5), a fixed 16 GiB KV cache and 192 sequences each.
    "2per-gpu": (["batch.engine_replicas=2", "engine.gpu_share=0.5", "engine.gpu_memory_utilization=0.45",
                  "engine.kv_cache_memory_bytes=17179869184", "engine.max_num_seqs=192"], None),
    "encoder-compile": (["engine.extra_engine_kwargs.compilation_config.compile_mm_encoder=true"],
                        ['compilation_config={"compile_mm_encoder": true}']),
    "encoder-graphs": (["engine.extra_engine_kwargs.compilation_config.compile_mm_encoder=true",
                        "engine.extra_engine_kwargs.compilation_config.cudagraph_mm_encoder=true"],
                       ['compilation_config={"compile_mm_encoder": true, "cudagraph_mm_encoder": true}']),
    "mnbt16k": (["engine.max_num_batched_tokens=16384"], ["max_num_batched_tokens=16384"]),
    # vLLM as it is, without our one patch (pipeline/engine/patches.py): its A/B on a GPU.
    "no-range-cache": (["runtime.env_vars.PIPELINE_VLLM_RANGE_CACHE='0'"], None),
    "mnbt4k": (["engine.max_num_batched_tokens=4096"], ["max_num_batched_tokens=4096"]),
    # 768 sequences: the fp8 KV cache held 500 at 36% use on an H200.
    "seqs768": (["engine.max_num_seqs=768", "batch.max_concurrent_batches=16"], ["max_num_seqs=768"]),
    # Host-time samples of every vLLM process (pipeline/engine/stack_sampler.py), read by bench.stack_report.
    "stacks": (["runtime.env_vars.PIPELINE_STACK_SAMPLES='{workdir}/stacks'"], None),
}
DEFAULT_RUNS = "plain-fp8,pipeline-fp8,pipeline-bf16,plain-bf16,pipeline-fp8-stock-images"


def split_run(name: str) -> tuple[str, list[str]]:
    """'pipeline-fp8+kv-fp8' -> ('pipeline-fp8', ['kv-fp8']); unknown parts fail before any engine starts."""
    base, *knobs = name.split("+")
    if base not in RUNS:
        raise ValueError(f"unknown run {base!r} (known: {', '.join(RUNS)})")
    for knob in knobs:
        if knob not in KNOBS:
            raise ValueError(f"unknown knob {knob!r} in {name!r} (known: {', '.join(KNOBS)})")
        if RUNS[base][0] == "plain" and KNOBS[knob][1] is None:
            raise ValueError(f"knob {knob!r} has no plain vLLM equivalent ({name!r})")
        if RUNS[base][0] == "online":
            raise ValueError(f"knobs apply to batch and plain runs, not online ones ({name!r})")
    return base, knobs


def parse_lanes(runs: str) -> list[list[str]]:
    """'a,b|c' -> [['a', 'b'], ['c']]: one lane per GPU, every run checked up front."""
    lanes = [[r for r in lane.split(",") if r] for lane in runs.split("|")]
    for lane in lanes:
        for name in lane:
            split_run(name)
    return lanes
# A failed run is followed at once by its fallback, if it has one (a lease has no time for a second try
# later), and the later runs of the same layout go straight to theirs.
FALLBACKS = {f"{kind}-fp8-tp{n}": f"{kind}-fp8-tp{n}-nccl" for kind in ("pipeline", "online") for n in (2, 4)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure_ceilings() -> dict:
    """The card's own ceilings (METHOD.md): dense bf16 and fp8 matmul rates, device copy bandwidth."""
    import torch

    if not torch.cuda.is_available():
        return {}

    def timed(fn, repeat=20):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeat / 1000

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * n**3 / timed(lambda: a @ b) / 1e12
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.tensor(1.0, device="cuda")
    fp8 = 2 * n**3 / timed(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)) / 1e12
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / timed(lambda: dst.copy_(src), repeat=10) / 1e12
    result = {"bf16_matmul_tflops": round(bf16, 1), "fp8_matmul_tflops": round(fp8, 1),
              "copy_bandwidth_tb_s": round(bandwidth, 2), "card": torch.cuda.get_device_name(0)}
    del a, b, a8, b8, src, dst
    torch.cuda.empty_cache()
    return result


def build_checkpoints(workdir: Path, shape: str, device: str) -> dict[str, Path]:
    from bench.fp8_checkpoint import convert
    from pipeline.testing.tiny_gemma3 import SHAPES, build_gemma3

    bf16, fp8 = workdir / f"gemma3-{shape}-bf16", workdir / f"gemma3-{shape}-fp8"
    if not (bf16 / "config.json").exists():
        started = time.time()
        build_gemma3(bf16, SHAPES[shape], device=device)
        log(f"built {bf16} in {time.time() - started:.0f}s")
    if not (fp8 / "config.json").exists():
        log(f"fp8 checkpoint: {convert(bf16, fp8, device=device)}")
    return {"bf16": bf16, "fp8": fp8}


def run_command(name: str, checkpoints: dict[str, Path], data: dict[str, Path], args) -> list[str]:
    """The `python` arguments of one named run."""
    base, knobs = split_run(name)
    kind, precision, extra = RUNS[base]
    extra = list(extra)  # RUNS itself stays as it is
    for knob in knobs:
        pipeline_sets, plain_args = KNOBS[knob]
        extra += [a for item in plain_args for a in ("--engine-arg", item)] if kind == "plain" else \
            [a for item in pipeline_sets for a in ("--set", item)]
    extra = [item.replace("{workdir}", str(args.workdir)) for item in extra]  # not format(): overrides hold braces
    if kind == "plain":
        command = ["-m", "bench.plain_vllm", str(checkpoints[precision]), str(data["plain"]), "--label", name,
                   "--n", str(args.plain_n), "--text-n", str(args.text_n)] + extra
        if args.device == "cpu":
            command += ["--engine-arg", "kv_cache_memory_bytes=1073741824", "--engine-arg", "max_model_len=1024",
                        "--engine-arg", "enforce_eager=true", "--engine-arg", "gpu_memory_utilization=null"]
    elif kind == "online":
        command = ["-m", "bench.online_latency", str(checkpoints[precision]), "--label", name,
                   "--workdir", str(args.workdir)] + extra
        if args.device == "cpu":
            command += ["--concurrency", "1,4", "--duration-s", "10", "--images", "16", "--max-tokens", "8",
                        "--set", "engine.device=cpu", "--set", "engine.kv_cache_memory_bytes=1073741824",
                        "--set", "engine.max_model_len=1024", "--set", "engine.enforce_eager=true"]
    else:
        command = ["-m", "bench.pipeline_run", str(checkpoints[precision]), str(data["pipeline"]), "--label", name] + extra
        if args.device == "cpu":
            command += ["--set", "engine.device=cpu", "--set", "engine.kv_cache_memory_bytes=1073741824",
                        "--set", "engine.max_model_len=1024", "--set", "engine.enforce_eager=true",
                        "--set", "runtime.local_num_cpus=8", "--set", "batch.prepare_replicas=1",
                        "--set", "sampling.max_tokens=16", "--set", "engine.max_num_seqs=16"]
    return command


def run_one(name: str, checkpoints: dict[str, Path], data: dict[str, Path], args, env: dict | None = None) -> list[dict]:
    command = run_command(name, checkpoints, data, args)
    log(f"run {name}: python {' '.join(command)}")
    started = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        process = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env,
                                 timeout=args.run_timeout_s)
        output, code = process.stdout + process.stderr, process.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"), "timeout"
    (Path(args.workdir) / f"{name}.log").write_text(output)
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    log(f"run {name}: exit {code} after {time.time() - started:.0f}s, {len(results)} results")
    if code != 0:
        log("\n".join(output.splitlines()[-25:]))
        results.append({"label": name, "failed": True, "exit": code, "tail": output[-3000:]})
    return results


class RunQueue:
    """The runs a lane has still to do, in order. File-backed (one name per line) when given a path, so
    that `bench/gpu_session.sh queue` can add runs while the orchestrator works; in memory otherwise.
    Both sides hold an exclusive flock on the file while they change it, so no added run is lost."""

    def __init__(self, names: list[str], path: Path | None = None):
        self.path, self._names = path, list(names)
        if path is not None:
            path.write_text("".join(f"{n}\n" for n in names))

    def _change(self, change) -> object:
        """names -> (new names, value): applied under the lock; returns value."""
        if self.path is None:
            self._names, value = change(self._names)
            return value
        import fcntl

        with open(self.path, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            names, value = change(f.read().split())
            f.seek(0)
            f.truncate()
            f.write("".join(f"{n}\n" for n in names))
            return value  # the lock goes with the file's closing

    def pop(self) -> str | None:
        return self._change(lambda names: (names[1:], names[0] if names else None))

    def edit(self, change) -> None:
        """Replace the waiting names by `change(names)`."""
        self._change(lambda names: (change(names), None))


def run_in_order(queue: "RunQueue | list[str]", run, record, fallbacks: dict[str, str] = FALLBACKS,
                 linger_s: float = 0, poll_s: float = 5) -> None:
    """Run each configuration in turn, recording its results at once. A failed one is followed
    immediately by its fallback, if it has one, and the queued runs of the same layout (pipeline and
    online at TP=4, say) are swapped for their fallbacks: they would fail the same way. With `linger_s`,
    an empty queue is watched that long for runs added from outside before the lane ends."""
    queue = queue if isinstance(queue, RunQueue) else RunQueue(queue)
    idle_since = time.monotonic()
    while True:
        name = queue.pop()
        if name is None:
            if time.monotonic() - idle_since >= linger_s:
                return
            time.sleep(poll_s)
            continue
        results = run(name)
        record(name, results)
        idle_since = time.monotonic()
        if any(r.get("failed") for r in results) and name in fallbacks:
            layout = layout_of({"label": name})
            queue.edit(lambda names: [fallbacks[name]] + [
                fallbacks[q] if q in fallbacks and layout_of({"label": q}) == layout else q for q in names])


def lane_env(lane: int, lanes: int, workdir: Path) -> dict[str, str]:
    """Environment of a lane's runs: its own GPU, and its own vLLM cache, so that two engines compiling at
    once never write the same cache directory. One lane keeps the machine's environment as it is."""
    if lanes == 1:
        return {}
    # PCI order: CUDA's index i is then NVML's index i, which the utilisation sampler reads.
    return {"CUDA_VISIBLE_DEVICES": str(lane), "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "VLLM_CACHE_ROOT": str(workdir / f"lane-{lane}" / "vllm-cache")}


def run_lanes(lanes: list[list[str]], run, record, workdir: Path, linger_s: float = 0, poll_s: float = 5) -> None:
    """Each lane's runs in order on its own GPU, the lanes side by side (threads: the work is in the
    runs' processes). `run(name, env)` runs one; `record` is called under a lock."""
    lock = threading.Lock()

    def locked_record(name, results, lane):
        for r in results:
            r.setdefault("lane", lane)
        with lock:
            record(name, results)

    def lane_main(lane: int, names: list[str]) -> None:
        env = lane_env(lane, len(lanes), workdir)
        queue = RunQueue(names, workdir / f"lane-{lane}.queue")
        run_in_order(queue, lambda name: run(name, env), lambda name, results: locked_record(name, results, lane),
                     linger_s=linger_s, poll_s=poll_s)

    threads = [threading.Thread(target=lane_main, args=(i, names), name=f"lane-{i}") for i, names in enumerate(lanes)]
    for thread in threads:
        thread.start()
        time.sleep(0 if len(lanes) == 1 else 2)  # staggered: the engines' start-ups do not all read weights at once
    for thread in threads:
        thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench")
    parser.add_argument("--results", required=True)
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--shape", default="12b", choices=["12b", "tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--plain-n", type=int, default=512)
    parser.add_argument("--text-n", type=int, default=512)
    parser.add_argument("--pipeline-n", type=int, default=1024)
    parser.add_argument("--run-timeout-s", type=int, default=600)
    parser.add_argument("--linger-s", type=float, default=0,
                        help="how long an idle lane waits for runs added to its queue file before it ends")
    parser.add_argument("--prepare-only", action="store_true",
                        help="(internal) ceilings, checkpoints and data, in a child process")
    args = parser.parse_args(argv)
    if not args.prepare_only:
        # Preparation touches the GPU; in a child process, so that the CUDA context and cached
        # allocations it leaves (26 GB after building the 12B) are gone before any engine starts.
        child = [sys.executable, "-m", "bench.gpu_throughput", "--prepare-only", *(argv or sys.argv[1:])]
        subprocess.run(child, check=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results)
    state = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}

    def save():
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(state, indent=1))

    if "ceilings" not in state:
        state["ceilings"] = measure_ceilings()
        log(f"ceilings: {state['ceilings']}")
        save()
    checkpoints = build_checkpoints(workdir, args.shape, args.device)
    data = {"plain": workdir / "w1-plain.parquet", "pipeline": workdir / f"w1-{args.pipeline_n}.parquet"}
    if not data["plain"].exists():
        # 16 warm-up, the timed requests, then fresh images for a profiled wave.
        write_w1_parquet(data["plain"], args.plain_n + 16 + PROFILE_N, start=100_000)
    if not data["pipeline"].exists():
        write_w1_parquet(data["pipeline"], args.pipeline_n)
    if "frontend_cost" not in state:
        from bench.frontend_cost import main as frontend_cost

        state["frontend_cost"] = frontend_cost([str(checkpoints["bf16"]), "--images", "64"])
        save()
    if args.prepare_only:
        return
    def record(name: str, results: list[dict]) -> None:
        state["runs"] = [r for r in state["runs"] if r.get("label") != name] + results
        save()

    run_lanes(parse_lanes(args.runs), lambda name, env: run_one(name, checkpoints, data, args, env), record,
              workdir, linger_s=args.linger_s)
    log("summary:")
    for r in state["runs"]:
        log(f"  {r.get('label'):28s} {r.get('workload', '-'):5s} "
            f"{r.get('requests_per_s', 'FAILED')!s:>8} req/s  gpu util {r.get('gpu_util_mean')}")


if __name__ == "__main__":
    main()
