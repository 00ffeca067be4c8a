"""Online latency of engine layouts on the same GPUs: one TP=N vLLM server vs N servers of TP=1.

    python -m bench.online_latency CHECKPOINT --layout tp4|4x1|tp2|2x1 [--subsets 2,1] [--concurrency 1,8,64] \
        [--set engine.field=value ...]

For each number of concurrent streams, clients send W1 requests (a distinct 896 px image each, so no
cache flatters either layout; 128 tokens out, streamed) for a fixed time, spread round-robin over the
servers. Printed per level: requests/s, latency and time-to-first-token p50/p99. With `--subsets`, an
NxT layout is also measured on its first k servers (the others idle), so "4 x TP=1" gives "2 x TP=1"
and "1 x TP=1" from the same engines at no extra start-up. vLLM's own OpenAI
server stands in for our Ray Serve endpoint because Ray 2.60's `ray.serve.llm` does not import with the
vLLM 0.26 the GPU image can run (docs/notes.md: Versions); the engine layout is what is compared.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import GENERATED_TOKENS, W1_PROMPT, bench_overrides, card_name, emit

SERVED = "gemma-3-12b-it"


def parse_layout(layout: str) -> tuple[int, int]:
    """'tp2' -> (1 server, TP 2); '2x1' -> (2 servers, TP 1)."""
    if layout.startswith("tp"):
        return 1, int(layout[2:])
    servers, tp = layout.split("x")
    return int(servers), int(tp)


def vllm_cli_args(kwargs: dict) -> list[str]:
    """Engine keyword arguments as `vllm serve` flags: --snake-case, booleans as --x / --no-x, dicts and
    lists as JSON, None left to vLLM's default."""
    args = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (dict, list)):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def server_engine_kwargs(overrides: list[str], checkpoint: str, tp: int) -> dict:
    """The batch job's engine arguments for this checkpoint and overrides, at tensor-parallel size `tp`."""
    from pipeline.config import PipelineConfig
    from pipeline.engine.args import engine_kwargs

    config = PipelineConfig.load(overrides=bench_overrides(checkpoint, overrides)).with_absolute_paths()
    return {**engine_kwargs(config), "tensor_parallel_size": tp}


def start_servers(checkpoint: str, layout: str, base_port: int, engine: dict, log_dir: Path):
    servers, tp = parse_layout(layout)
    processes, urls = [], []
    for index in range(servers):
        port = base_port + index
        devices = ",".join(str(index * tp + k) for k in range(tp))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices}
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
                   "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
                   *vllm_cli_args(engine)]
        log = open(log_dir / f"server-{layout}-{index}.log", "w")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}/v1")
    return processes, urls


def wait_ready(processes, urls, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    pending = set(urls)
    while pending:
        for process in processes:
            if process.poll() is not None:
                raise SystemExit(f"a vLLM server exited with {process.returncode}")
        for url in list(pending):
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    pending.discard(url)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise SystemExit(f"servers not ready after {timeout_s}s: {sorted(pending)}")
        time.sleep(2)


async def stream_one(client, image_url: str, max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    stream = await client.chat.completions.create(
        model=SERVED, stream=True, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                               {"type": "text", "text": W1_PROMPT}]}])
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    end = time.perf_counter()
    return end - started, (first or end) - started


async def load(urls: list[str], images: list[str], streams: int, duration_s: float, max_tokens: int,
               api_key: str = "none") -> dict:
    import httpx
    import openai

    # One connection per stream: httpx's default pool (100) would queue the 256-stream level client-side.
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    clients = [openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=600,
                                  http_client=openai.DefaultAsyncHttpxClient(limits=limits)) for url in urls]
    latencies, ttfts, errors, error_kinds = [], [], 0, {}
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + duration_s

    async def worker():
        nonlocal errors
        while time.perf_counter() < stop_at:
            n = next(counter)
            try:
                latency, ttft = await stream_one(clients[n % len(clients)], images[n % len(images)], max_tokens)
                latencies.append(latency)
                ttfts.append(ttft)
            except openai.APIError as exc:  # counted and named: a number alone says nothing about the cause
                errors += 1
                kind = f"{type(exc).__name__}: {str(exc)[:120]}"
                error_kinds[kind] = error_kinds.get(kind, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.close()

    def q(values, fraction):
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3) if ordered else None

    return {"streams": streams, "ok": len(latencies), "errors": errors, "error_kinds": error_kinds,
            "seconds": round(elapsed, 1),
            "requests_per_s": round(len(latencies) / elapsed, 2),
            "latency_p50_s": q(latencies, 0.5), "latency_p99_s": q(latencies, 0.99),
            "ttft_p50_s": q(ttfts, 0.5), "ttft_p99_s": q(ttfts, 0.99),
            "latency_mean_s": round(statistics.mean(latencies), 3) if latencies else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--layout", required=True, help="tpN (one server) or NxT (N servers of TP T)")
    parser.add_argument("--label", required=True)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--duration-s", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=GENERATED_TOKENS)
    parser.add_argument("--images", type=int, default=2048, help="distinct W1 images to cycle through")
    parser.add_argument("--base-port", type=int, default=18100)
    parser.add_argument("--workdir", default="/tmp/bench")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override, as for the batch job (engine.*)")
    parser.add_argument("--ready-timeout-s", type=float, default=900)
    parser.add_argument("--subsets", default="", help="also measure on the first k servers, e.g. 2,1")
    args = parser.parse_args(argv)

    from concurrent.futures import ProcessPoolExecutor

    from bench.common import w1_image_bytes

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(8) as pool:
        blobs = list(pool.map(w1_image_bytes, range(200_000, 200_000 + args.images), chunksize=32))
    images = ["data:image/jpeg;base64," + base64.b64encode(b).decode() for b in blobs]
    servers, tp = parse_layout(args.layout)
    engine = server_engine_kwargs(args.overrides, args.checkpoint, tp)
    processes, urls = start_servers(args.checkpoint, args.layout, args.base_port, engine, workdir)
    try:
        started = time.perf_counter()
        wait_ready(processes, urls, args.ready_timeout_s)
        startup_s = time.perf_counter() - started
        # Warm-up, not counted: every server at the highest concurrency, so the batch shapes of all levels
        # (vision encoder included, which has no CUDA graphs) have run once before anything is timed. The
        # 2026-11-27 lease warmed with 2 streams only, and its first high-concurrency level paid for that.
        levels = [int(c) for c in args.concurrency.split(",")]
        asyncio.run(load(urls, images[-256:], max(levels), 10, 16))
        used = [servers] + [int(k) for k in args.subsets.split(",") if k and int(k) < servers]
        for count in used:
            layout = args.layout if count == servers else f"{count}x{tp}"
            for streams in levels:
                result = asyncio.run(load(urls[:count], images, streams, args.duration_s, args.max_tokens))
                emit({"label": args.label.replace(args.layout, layout), "layout": layout,
                      "engine": f"vLLM OpenAI server, layout {layout}"
                                + (f" (of {args.layout} started)" if layout != args.layout else ""),
                      "workload": "W1-online", "checkpoint": args.checkpoint, "card": card_name(),
                      "gpus": servers * tp, "startup_s": round(startup_s, 1), **result})
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
