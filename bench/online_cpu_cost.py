"""CPU seconds per request of each process on the online endpoint's path, for W1 and W2 images.

    python -m bench.online_cpu_cost [--model DIR] [--requests 48] [--streams 8] [--max-tokens 8] \
        [--set FIELD=VALUE ...] [--json PATH]

It starts `python -m jobs.serve` with the tiny CPU config (bench.serve_load.start_local), sends the same
number of streamed chat requests of each workload through the `openai` client, and reads the CPU time
(user + system, every thread) of each process of the server's tree before and after: Serve's HTTP proxy,
the ingress replicas (our guard in front of Ray's OpenAI ingress), the engine replica (Ray's LLM server),
vLLM's engine core, the rate limiter, and the rest. Printed: CPU ms per request of each, per workload.

W1: distinct 896 x 896 JPEGs, which the ingress passes on as they came; W2: distinct 4032 x 3024 q90
camera JPEGs (~2 MB), which the ingress decodes and resizes to the model's size. The engine is the tiny
random-weight model on CPU and generates `--max-tokens` tokens: engine-core time here says nothing about
a GPU, but every other process does the same work per request as on a GPU host, so its CPU time per
request, times a GPU's request rate, is the CPU it needs there (`--rate`: the H200's measured W1 rate at
64 streams). The CPU of a different host differs: compare rows within one run.
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

import psutil

from bench.common import W1_PROMPT, camera_image_bytes, w1_image_bytes

ROOT = Path(__file__).resolve().parents[1]
# docs/performance.md, the online endpoint on one H200 (fourth lease): requests/s at 64 W1 streams.
H200_W1_REQUESTS_PER_S = 21.66

# Roles by the process title Ray gives each actor (`ray::<Class>...`), in the order printed.
ROLES = (("proxy", "ProxyActor"), ("ingress", "GuardedIngress"), ("engine replica", "LLMServer"),
         ("engine core", "EngineCore"), ("engine worker", "VLLM::Worker"), ("engine worker", "RayWorkerProc"),
         ("rate limiter", "RateLimiter"), ("serve controller", "ServeController"), ("raylet", "raylet/raylet"),
         ("gcs", "gcs_server"), ("dashboard", "DashboardAgent"), ("dashboard", "dashboard"),
         ("driver", "jobs.serve"))
# The model's own processes: their CPU here says nothing about a GPU host, so no cores per GPU for them.
ENGINE_ROLES = ("engine core", "engine worker")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("TINY_GEMMA3_DIR", str(ROOT / "work" / "tiny-gemma3")))
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--requests", type=int, default=48, help="timed requests per workload")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--workloads", default="w1,w2")
    parser.add_argument("--rate", type=float, default=H200_W1_REQUESTS_PER_S,
                        help="requests/s per GPU to turn CPU per request into cores per GPU")
    parser.add_argument("--json", type=Path, help="write the result here too")
    return parser.parse_args(argv)


def title_of(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def role_of(title: str) -> str:
    return next((role for role, marker in ROLES if marker in title), "other")


def cpu_by_process(root: psutil.Process) -> dict[int, tuple[str, str, float]]:
    """pid -> (role, title, CPU seconds so far) for the server and every descendant (Ray's workers
    included: the embedded Ray is started by jobs.serve)."""
    result = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        title = title_of(process)
        result[process.pid] = (role_of(title), title, times.user + times.system)
    return result


def used_in_window(before: dict, after: dict) -> list[tuple[str, str, float]]:
    """(role, title, CPU seconds) of each process between the two readings."""
    return [(role, title, seconds - (before[pid][2] if pid in before else 0.0))
            for pid, (role, title, seconds) in after.items()]


def per_request(used: list[tuple[str, str, float]], requests: int) -> tuple[dict[str, float], list]:
    """CPU ms per request by role (processes of one role summed), and the four busiest processes of no
    named role with theirs (what "other" is)."""
    per_role: dict[str, float] = {}
    for role, _, seconds in used:
        per_role[role] = per_role.get(role, 0.0) + 1000 * seconds / max(requests, 1)
    others = sorted(((title[:70].strip(), round(1000 * seconds / max(requests, 1), 1))
                     for role, title, seconds in used if role == "other"), key=lambda item: -item[1])[:4]
    return {role: round(ms, 1) for role, ms in per_role.items()}, others


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


async def send_all(client, model: str, urls: list[str], streams: int, max_tokens: int) -> tuple[int, list[str]]:
    queue: asyncio.Queue = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)
    errors: list[str] = []
    done = 0

    async def worker():
        nonlocal done
        while not queue.empty():
            url = queue.get_nowait()
            try:
                stream = await client.chat.completions.create(
                    model=model, max_tokens=max_tokens, temperature=0, stream=True,
                    extra_body={"ignore_eos": True},
                    messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                           {"type": "text", "text": W1_PROMPT}]}])
                async for _ in stream:
                    pass
                done += 1
            except Exception as exc:  # noqa: BLE001 - counted and printed; a benchmark, not a test
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    await asyncio.gather(*(worker() for _ in range(streams)))
    await client.close()
    return done, errors


def measure(args, base_url: str, key: str, server: psutil.Process, name: str, urls: list[str]) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
    model = "gemma-3-12b-it"
    asyncio.run(send_all(client, model, urls[:args.streams], args.streams, args.max_tokens))  # warm-up
    before = cpu_by_process(server)
    started = time.monotonic()
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
    done, errors = asyncio.run(send_all(client, model, urls[args.streams:], args.streams, args.max_tokens))
    elapsed = time.monotonic() - started
    per_request_ms, others = per_request(used_in_window(before, cpu_by_process(server)), done)
    return {"workload": name, "requests": done, "errors": errors[:5], "error_count": len(errors),
            "seconds": round(elapsed, 1), "cpu_ms_per_request": per_request_ms, "busiest_other": others,
            "cores_per_gpu_at_rate": {role: round(ms * args.rate / 1000, 2) for role, ms in per_request_ms.items()
                                      if role not in (*ENGINE_ROLES, "other")}}


def main(argv=None) -> int:
    from bench.serve_load import start_local

    args = parse_args(argv)
    count = args.requests + args.streams
    images = {"w1": lambda: [data_url(w1_image_bytes(10_000 + i)) for i in range(count)],
              "w2": lambda: [data_url(camera_image_bytes(20_000 + i)) for i in range(count)]}
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    urls = {name: images[name]() for name in workloads}
    process, base_url, key = start_local(argparse.Namespace(config=args.config, model=args.model,
                                                            overrides=args.overrides))
    results = []
    try:
        server = psutil.Process(process.pid)
        for name in workloads:
            results.append(measure(args, base_url, key, server, name, urls[name]))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    roles = list(dict.fromkeys(role for role, _ in ROLES)) + ["other"]
    print(f"CPU ms per request ({args.streams} streams, {args.max_tokens} tokens, {os.cpu_count()} CPUs here):")
    print(f"{'process':<18}" + "".join(f"{r['workload']:>10}" for r in results))
    for role in roles:
        print(f"{role:<18}" + "".join(f"{r['cpu_ms_per_request'].get(role, 0.0):>10.1f}" for r in results))
    print(f"{'requests':<18}" + "".join(f"{r['requests']:>10}" for r in results))
    print(f"{'errors':<18}" + "".join(f"{r['error_count']:>10}" for r in results))
    for result in results:
        print(f"{result['workload']}: busiest of other (ms per request): {result['busiest_other']}")
        for error in result["errors"]:
            print(f"  {result['workload']} error: {error}")
    summary = {"streams": args.streams, "max_tokens": args.max_tokens, "overrides": args.overrides,
               "cpus": os.cpu_count(), "rate": args.rate, "results": results}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if all(r["error_count"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
