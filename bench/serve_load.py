"""Load benchmark of the online endpoint: N concurrent OpenAI clients for a fixed time.

Against a running endpoint:

    python bench/serve_load.py --base-url http://127.0.0.1:8000/v1 --api-key KEY

Or let it start the tiny CPU app itself (`python -m jobs.serve`, stopped at the end):

    python bench/serve_load.py --start-local --model work/tiny-gemma3

With --start-local the server's log is work/bench-serve.log (replica changes appear there as the
Serve controller's "Adding N replica" lines). Each client sends one chat request at a time (an image + a short question, max_tokens fixed with
ignore_eos so every request generates the same number of tokens) until the time is up. Printed:
requests/s, generated tokens/s, latency p50/p90/p99, and errors by status. A benchmark, not a test:
numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("GEMMA_API_KEY", ""))
    parser.add_argument("--start-local", action="store_true", help="start `python -m jobs.serve` with the tiny config")
    parser.add_argument("--model", default=str(ROOT / "work" / "tiny-gemma3"), help="checkpoint for --start-local")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"), help="config for --start-local")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override for --start-local, e.g. serve.max_replicas=2 (repeatable)")
    parser.add_argument("--served-name", default="gemma-3-12b-it")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--image-px", type=int, default=640, help="side of the test image; 0 sends text only")
    return parser.parse_args(argv)


def test_image(side: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (side * 3 // 4, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


async def client_loop(client, request: dict, stop_at: float, latencies: list, errors: Counter, tokens: list):
    import openai

    while time.monotonic() < stop_at:
        started = time.monotonic()
        try:
            reply = await client.chat.completions.create(**request)
            latencies.append(time.monotonic() - started)
            tokens.append(reply.usage.completion_tokens)
        except openai.APIStatusError as exc:
            errors[f"{exc.status_code} {exc.code or ''}".strip()] += 1
        except openai.APIError as exc:
            errors[type(exc).__name__] += 1


async def run_load(args, base_url: str, api_key: str) -> dict:
    import httpx
    import openai

    content = [{"type": "text", "text": "Describe the image in one sentence."}]
    if args.image_px:
        content.insert(0, {"type": "image_url", "image_url": {"url": test_image(args.image_px)}})
    request = {"model": args.served_name, "messages": [{"role": "user", "content": content}],
               "max_tokens": args.max_tokens, "temperature": 0, "extra_body": {"ignore_eos": True}}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300,
                                http_client=openai.DefaultAsyncHttpxClient(limits=limits))
    await client.chat.completions.create(**{**request, "max_tokens": 2})  # warm-up, not counted
    latencies: list[float] = []
    tokens: list[int] = []
    errors: Counter = Counter()
    started = time.monotonic()
    stop_at = started + args.duration_s
    await asyncio.gather(*(client_loop(client, request, stop_at, latencies, errors, tokens)
                           for _ in range(args.clients)))
    elapsed = time.monotonic() - started
    await client.close()
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"clients": args.clients, "duration_s": round(elapsed, 1), "ok": len(latencies),
            "errors": dict(errors), "requests_per_s": round(len(latencies) / elapsed, 2),
            "generated_tokens_per_s": round(sum(tokens) / elapsed, 1),
            "latency_s": {"p50": round(pct(0.50), 3), "p90": round(pct(0.90), 3), "p99": round(pct(0.99), 3),
                          "max": round(ordered[-1], 3) if ordered else None},
            "image_px": args.image_px, "max_tokens": args.max_tokens}


def start_local(args) -> tuple[subprocess.Popen, str, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key = "bench-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
    env = {**os.environ, "GEMMA_API_KEYS": key, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(ROOT / "work" / "bench-serve.log", "w") if (ROOT / "work").is_dir() else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--config", args.config, "--model", args.model,
                                "--set", f"serve.port={port}", *[a for o in args.overrides for a in ("--set", o)]],
                               cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise SystemExit(f"jobs.serve exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    print(f"local endpoint ready in {time.monotonic() - started:.0f}s at {base}/v1", file=sys.stderr)
    return process, f"{base}/v1", key


def main(argv=None) -> int:
    args = parse_args(argv)
    process = None
    if args.start_local:
        process, base_url, api_key = start_local(args)
    elif args.base_url:
        base_url, api_key = args.base_url, args.api_key
    else:
        raise SystemExit("pass --base-url (and --api-key) or --start-local")
    try:
        result = asyncio.run(run_load(args, base_url, api_key))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    print(f"{result['clients']} clients, {result['duration_s']}s: {result['requests_per_s']} requests/s, "
          f"{result['generated_tokens_per_s']} generated tokens/s, latency p50 {result['latency_s']['p50']}s "
          f"p99 {result['latency_s']['p99']}s, ok {result['ok']}, errors {result['errors'] or 0}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
