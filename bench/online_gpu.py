"""The online endpoint on one GPU: our Ray Serve app (`jobs.serve`) against the model card's `vllm serve`.

    python -m bench.online_gpu CHECKPOINT --targets ours,card,card-eager --results FILE \
        [--concurrency 1,8,64,256] [--duration-s 15] [--config configs/gpu-fp8.yaml]

Targets, one at a time on the card, same checkpoint, each behind an API key:
  ours        `python -m jobs.serve --config CONFIG --model CHECKPOINT` (one engine replica, TP 1), the
              package as installed (its vLLM plugins found through their entry points)
  card        the model card's command: `vllm serve CHECKPOINT --gpu-memory-utilization 0.9
              --max-model-len 8192 --api-key K --served-model-name gemma-3-12b-it` (CUDA graphs)
  card-eager  the same with `--enforce-eager`, as the card prints it
  ours-ray    `ours` with `serve.in_process_engine=false`: the model in a separate Ray worker, the executor
              `ray.serve.llm` gives vLLM by default (the comparison behind pipeline/serve/in_process.py)
  ours-scale  `ours` with two replicas allowed on the card (half of it each): instead of the levels, a
              rising load until the second replica serves, every request logged (bench/online_scale.py)

For each: start-up time to ready; the first request after ready and then three more, one at a time
(a distinct 896 px image + a short prompt -> 128 tokens, streamed); tool calls through the `openai`
client with tool_choice auto, required and named (arguments parsed as JSON and checked against the
tool's schema); then, after an untimed warm-up at the highest concurrency, every level for a fixed time
(`bench.online_latency.load`: TTFT and latency p50/p99, requests/s, errors by kind), and one level with
camera-sized photos (W2: distinct 4032x3024 JPEGs, ~2 MB, that each server must decode and resize). Each target's
record is appended to the results file as soon as it exists, so a lease that ends early keeps what ran.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import GENERATED_TOKENS, W1_PROMPT, camera_image_bytes, stop_process_group, w1_image_bytes
from bench.online_latency import SERVED, load, stream_one

# The model card's flags, verbatim, besides the model path and where it listens.
CARD_FLAGS = ["--gpu-memory-utilization", "0.9", "--max-model-len", "8192"]
TARGETS = ("ours", "ours-ray", "ours-scale", "card", "card-eager")
# ours-scale: two engine replicas allowed on the one card (half of it each), scaling out above 16 requests
# in flight per replica: the one -> two scale-up run (bench/online_scale.py).
# A fixed KV cache per replica (16 GiB, as bench/gpu_throughput.py's two-per-GPU runs): the config refuses a
# share below 1 without one, since vLLM would size it from free memory that the neighbour is changing.
SCALE_SETS = ["engine.gpu_share=0.5", "engine.gpu_memory_utilization=0.42", "engine.kv_cache_memory_bytes=17179869184",
              "serve.min_replicas=1", "serve.max_replicas=2", "serve.target_ongoing_requests=16"]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TOOL_CHOICES = {"auto": "auto", "required": "required",
                "named": {"type": "function", "function": {"name": "get_weather"}}}


def target_command(target: str, checkpoint: str, port: int, key: str, config: str,
                   overrides: list[str]) -> tuple[list[str], dict]:
    """The server's argv and the environment additions it needs."""
    if target.startswith("ours"):
        sets = ["serve.host=127.0.0.1", f"serve.port={port}", "serve.min_replicas=1", "serve.max_replicas=1",
                "model.quantization=any", "runtime.local_num_cpus=16", "engine.enforce_eager=false",
                # The benchmark is one client at full load: the per-key limits would measure themselves.
                "serve.rate_limit={requests_per_minute: 1000000000, tokens_per_minute: 1000000000000}",
                *(SCALE_SETS if target == "ours-scale" else []),
                *(["serve.in_process_engine=false"] if target == "ours-ray" else []), *overrides]
        command = [sys.executable, "-m", "jobs.serve", "--config", config, "--model", checkpoint]
        env = {"GEMMA_API_KEYS": key}
        return command + [a for s in sets for a in ("--set", s)], env
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", checkpoint, *CARD_FLAGS,
               "--api-key", key, "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port)]
    return command + (["--enforce-eager"] if target == "card-eager" else []), {}


# Ray Serve restarts a replica that fails its start, and jobs.serve only exits once Serve gives up: on
# 2026-12-02 that was three engine starts (~8 min) for one missing tool parser. The first failure is enough.
REPLICA_FAILED = "the replica will be stopped"


def wait_ready(process: subprocess.Popen, target: str, base: str, key: str, timeout_s: float,
               log_path: Path | None = None) -> float:
    """Seconds until the server says it is ready: our ingress's /ready, vLLM's /health and /v1/models."""
    import httpx

    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"}
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{target} exited with {process.returncode} before it was ready")
        if log_path is not None and log_path.exists() and REPLICA_FAILED in log_path.read_text(errors="replace"):
            raise RuntimeError(f"{target}: a Serve replica failed its start (see {log_path})")
        try:
            if target.startswith("ours"):
                ok = httpx.get(f"{base}/ready", timeout=5).status_code == 200
            else:
                ok = (httpx.get(f"{base}/health", timeout=5).status_code == 200
                      and httpx.get(f"{base}/v1/models", headers=headers, timeout=5).status_code == 200)
            if ok:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"{target} not ready after {timeout_s}s")
        time.sleep(1)


def nvidia_smi(*args: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True).stdout
    except FileNotFoundError:  # a machine without an NVIDIA GPU (the CPU check of this script)
        return ""


def gpu_memory_used_mib() -> list[int]:
    out = nvidia_smi("--query-gpu=memory.used", "--format=csv,noheader,nounits")
    return [int(v) for v in out.split()] if out.strip() else []


def gpu_pids() -> list[int]:
    out = nvidia_smi("--query-compute-apps=pid", "--format=csv,noheader")
    return [int(v) for v in out.split() if v.strip().isdigit()]


def stop(process: subprocess.Popen, grace_s: float = 90) -> None:
    """SIGTERM (jobs.serve shuts Serve and its embedded Ray down on it), then the group, then whatever
    this run started that still holds the GPU: the next server needs the whole card."""
    stop_process_group(process, grace_s)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(gpu_memory_used_mib()) > 2048:
        time.sleep(2)
    for pid in set(gpu_pids()) - {os.getpid()}:  # only processes of this run hold the lent card
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def check_arguments(arguments: str) -> tuple[bool, bool, str]:
    """(valid JSON object, matches the tool's schema, reason)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        return False, False, f"not JSON: {exc}"
    if not isinstance(value, dict):
        return False, False, "not a JSON object"
    try:
        import jsonschema

        jsonschema.validate(value, WEATHER_TOOL["function"]["parameters"])
    except ImportError:
        props = WEATHER_TOOL["function"]["parameters"]["properties"]
        ok = set(value) == set(props) and all(value[k] in props[k]["enum"] for k in props)
        return True, ok, "" if ok else "schema mismatch (checked without jsonschema)"
    except jsonschema.ValidationError as exc:
        return True, False, f"schema: {exc.message}"
    return True, True, ""


async def tool_calls(base_url: str, key: str) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
    results = []
    for name, choice in TOOL_CHOICES.items():
        record = {"tool_choice": name}
        started = time.perf_counter()
        try:
            reply = await client.chat.completions.create(
                model=SERVED, temperature=0, max_tokens=256, tools=[WEATHER_TOOL], tool_choice=choice,
                messages=[{"role": "user", "content": "What is the weather in Paris, in celsius? Use the tool."}])
            message = reply.choices[0].message
            calls = message.tool_calls or []
            record.update(status=200, finish_reason=reply.choices[0].finish_reason, tool_calls=len(calls),
                          content=(message.content or "")[:200])
            record["calls"] = []
            for call in calls:
                valid, schema_ok, reason = check_arguments(call.function.arguments)
                record["calls"].append({"name": call.function.name, "arguments": call.function.arguments[:300],
                                        "json_valid": valid, "schema_valid": schema_ok, "reason": reason})
        except openai.APIStatusError as exc:
            record.update(status=exc.status_code, error=str(exc)[:400])
        except openai.APIError as exc:
            record.update(status=None, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        record["seconds"] = round(time.perf_counter() - started, 3)
        results.append(record)
    await client.close()
    return results


async def single_requests(base_url: str, key: str, images: list[str], count: int) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
    out = []
    for image in images[:count]:
        try:
            latency, ttft = await stream_one(client, image, GENERATED_TOKENS)
            out.append({"latency_s": round(latency, 3), "ttft_s": round(ttft, 3)})
        except openai.APIError as exc:
            out.append({"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    await client.close()
    return out


def card_name() -> str:
    """From nvidia-smi: this process must not hold a CUDA context (stop() clears the card of others)."""
    out = nvidia_smi("--query-gpu=name,memory.total,driver_version", "--format=csv,noheader").strip()
    return out or "unknown"


def versions() -> dict:
    """Installed distributions, read from their metadata (nothing imported, no CUDA context)."""
    from importlib.metadata import PackageNotFoundError, entry_points, version

    found = {}
    for name in ("vllm", "ray", "torch", "transformers", "openai", "gemma3-fp8-pipeline"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None

    found["vllm_general_plugins"] = sorted(f"{e.name}={e.value}" for e in entry_points(group="vllm.general_plugins"))
    return found


def run_target(target: str, args, images: list[str], camera: list[str], key: str, port: int) -> dict:
    command, env_add = target_command(target, args.checkpoint, port, key, args.config, args.overrides)
    shown = [("K" if a == key else a) for a in command]
    record = {"target": target, "command": " ".join(shown), "card": card_name(), "versions": versions(),
              "checkpoint": args.checkpoint, "workload": "W1-online: one 896 px JPEG + short prompt -> 128 tokens"}
    log_path = Path(args.workdir) / f"server-{target}.log"
    # Engine stats every 2 s (vLLM's default is 10, longer than a level), on both sides alike.
    env = {**os.environ, "VLLM_LOG_STATS_INTERVAL": "2", **env_add}
    process = subprocess.Popen(command, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True, cwd=args.workdir)
    base = f"http://127.0.0.1:{port}"
    try:
        record["startup_s"] = round(wait_ready(process, target, base, key, args.ready_timeout_s, log_path), 1)
        print(f"[{target}] ready in {record['startup_s']}s", flush=True)
        # First request after ready, then three more one at a time: fresh images, nothing warmed up before.
        singles = asyncio.run(single_requests(f"{base}/v1", key, images[-4:], 4))
        record["first_request"], record["next_requests"] = singles[0], singles[1:]
        print(f"[{target}] first {singles[0]} then {singles[1:]}", flush=True)
        record["tools"] = asyncio.run(tool_calls(f"{base}/v1", key))
        print(f"[{target}] tools {json.dumps(record['tools'])[:600]}", flush=True)
        if target == "ours-scale":
            record["scale"] = scale_run(base, key, images, args, log_path)
            return record
        levels = [int(c) for c in args.concurrency.split(",")]
        # Untimed: every batch shape of the levels (the vision encoder has no CUDA graphs) runs once first.
        asyncio.run(load([f"{base}/v1"], images[-260:-4], max(levels), 10, 16, api_key=key))
        record["levels"] = []
        for streams in levels:
            result = probed_level(f"{base}/v1", images[:-260], streams, args.duration_s, key, log_path)
            record["levels"].append(result)
            report_level(target, "W1", result)
        if camera:
            # W2: the same request with a camera-sized photo; every request a distinct image (see
            # camera_image_bytes), so neither server's processed-image cache answers for the resize.
            result = probed_level(f"{base}/v1", camera, args.camera_streams, args.duration_s, key, log_path)
            result["distinct_images"] = len(camera)
            record["camera"] = result
            report_level(target, "W2", result)
    except Exception as exc:  # noqa: BLE001 - recorded with the server log's tail; the next target still runs
        record["failed"] = f"{type(exc).__name__}: {exc}"
        print(f"[{target}] FAILED {record['failed']}", flush=True)
    finally:
        stop(process)
        record["log_facts"] = log_facts(log_path)
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        record["server_log_tail"] = tail.replace(key, "K")  # vLLM prints its non-default args, the key too
    return record


def cpu_top(lines: int = 16) -> str:
    """The busiest processes over two seconds (top's second sample: the first is since boot). Says
    whether a front-end process (our ingress, Serve's replica, `vllm serve`'s API server) is at 100% of
    a core while the GPU waits."""
    try:
        out = subprocess.run(["top", "-b", "-n", "2", "-d", "2", "-w", "200", "-c"], capture_output=True,
                             text=True, timeout=20).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return ""
    last = out.rsplit("top - ", 1)[-1].splitlines()
    return "\n".join(line.rstrip()[:200] for line in last[:6 + lines])


def probed_level(url: str, images: list[str], streams: int, duration_s: float, key: str, log_path: Path) -> dict:
    """One load level, with a CPU snapshot from its middle and the engine's stats lines logged during it."""
    import threading

    offset = log_path.stat().st_size if log_path.exists() else 0
    probe: dict = {}
    sampler = threading.Thread(target=lambda: (time.sleep(duration_s / 2), probe.update(top=cpu_top())), daemon=True)
    sampler.start()
    result = asyncio.run(load([url], images, streams, duration_s, GENERATED_TOKENS, api_key=key))
    sampler.join(timeout=30)
    result["cpu_top"] = probe.get("top", "")
    with open(log_path, errors="replace") as log:
        log.seek(offset)
        result["engine_stats"] = [line.strip()[-260:] for line in log if "throughput:" in line][-10:]
    return result


# Lines of a server log that say how its engine runs: which executor, whether steps are scheduled ahead
# (async scheduling), CUDA graphs, the stats lines.
LOG_FACTS = ("executor class", "sync scheduling", "distributed_executor_backend", "CUDA graph", "cudagraph",
             "Using max model len", "throughput:")


def log_facts(log_path: Path, limit: int = 40) -> list[str]:
    if not log_path.exists():
        return []
    found = [line.strip()[-300:] for line in log_path.read_text(errors="replace").splitlines()
             if any(fact in line for fact in LOG_FACTS)]
    return found[:limit // 2] + found[-limit // 2:] if len(found) > limit else found


def scale_run(base: str, key: str, images: list[str], args, log_path: Path) -> dict:
    """The rising load of bench/online_scale.py against the started endpoint; prints its summary."""
    import httpx
    import openai

    from bench.online_scale import rising_load

    steps = [(int(n), float(s)) for n, s in (step.split(":") for step in args.scale_steps.split(","))]
    top = max(n for n, _ in steps)
    limits = httpx.Limits(max_connections=top + 8, max_keepalive_connections=top + 8)
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=600,
                                http_client=openai.DefaultAsyncHttpxClient(limits=limits))
    counter = iter(range(10**9))

    async def one():
        return await stream_one(client, images[next(counter) % len(images)], GENERATED_TOKENS)

    async def run():
        try:
            return await rising_load(one, steps, log_path, wait_limit_s=args.scale_wait_s, after_s=args.scale_after_s)
        finally:
            await client.close()

    result = asyncio.run(run())
    print(f"[ours-scale] {result['requests']} requests, {result['failed']} failed {result['failures_by_kind']}; "
          f"timeline {json.dumps(result['timeline'])}; phases {json.dumps(result['per_replica_phase'])}", flush=True)
    return result


def report_level(target: str, workload: str, result: dict) -> None:
    print(f"[{target}] {workload} {result['streams']:>3} streams: {result['requests_per_s']} req/s, latency p50 "
          f"{result['latency_p50_s']} p99 {result['latency_p99_s']}, ttft p50 {result['ttft_p50_s']} "
          f"p99 {result['ttft_p99_s']}, ok {result['ok']}, errors {result['errors']}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--targets", default="ours,card,card-eager")
    parser.add_argument("--results", required=True)
    parser.add_argument("--config", default="configs/gpu-fp8.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for ours")
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--duration-s", type=float, default=15)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--camera-streams", type=int, default=64,
                        help="streams of the camera-sized photo level (W2, 4032x3024 JPEG); 0 leaves it out")
    parser.add_argument("--camera-images", type=int, default=640, help="distinct camera photos for that level")
    parser.add_argument("--port", type=int, default=18300)
    parser.add_argument("--workdir", default="/tmp/online")
    parser.add_argument("--ready-timeout-s", type=float, default=600)
    parser.add_argument("--scale-steps", default="4:30,16:30,64:45",
                        help="ours-scale: streams:seconds steps; the last holds until two replicas warmed up")
    parser.add_argument("--scale-wait-s", type=float, default=300, help="ours-scale: longest wait for the second")
    parser.add_argument("--scale-after-s", type=float, default=60, help="ours-scale: the top step after it")
    args = parser.parse_args(argv)
    args.checkpoint = str(Path(args.checkpoint).resolve())
    args.config = str(Path(args.config).resolve())
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")

    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(8) as pool:
        blobs = list(pool.map(w1_image_bytes, range(300_000, 300_000 + args.images), chunksize=16))
        camera_blobs = (list(pool.map(camera_image_bytes, range(args.camera_images), chunksize=32))
                        if args.camera_streams else [])
    images = ["data:image/jpeg;base64," + base64.b64encode(b).decode() for b in blobs]
    camera = ["data:image/jpeg;base64," + base64.b64encode(b).decode() for b in camera_blobs]
    del blobs, camera_blobs
    key = "bench-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
    results_path = Path(args.results)
    state = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    state["prompt"] = W1_PROMPT
    for index, target in enumerate(targets):
        state["runs"].append(run_target(target, args, images, camera, key, args.port + index))
        results_path.write_text(json.dumps(state, indent=1))
    print("done", flush=True)


if __name__ == "__main__":
    main()
