"""One -> two engine replicas under a rising load, every request logged (issue online-gpu's scale-up run).

`rising_load` drives an already started endpoint with closed-loop streams whose number rises in steps
(e.g. 4, then 16, then 64), holds the top step until the server log shows a second engine replica
warmed up (or a time limit), then holds it `after_s` longer so both replicas serve. Every request is one
line of the request log: wall-clock start and end, the number of streams at its start, latency and
time to first token, and its outcome ("ok" or the error's kind and message). The replicas' timeline comes
from the same server log: Serve's "Adding 1 replica" decisions and each engine replica's warm-up lines
(`pipeline.serve.warmup` logs them with the replica's id), with their wall-clock times.

The runner on the card (`bench/online_gpu.py`, target `ours-scale`) starts `jobs.serve` with two
replicas allowed on one GPU (`engine.gpu_share=0.5`) and calls this.
"""
from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from pathlib import Path

# Serve's controller and our warm-up, as they appear in jobs.serve's output (Ray prefixes and colour
# codes around them). The timestamp is Serve's logging format: "2026-12-03 07:22:38,003".
_STAMP = r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3})"
SCALE_DECISION = re.compile(_STAMP + r".*Adding (\d+) replicas? to Deployment\(name='(?!GuardedIngress|RateLimiter)([^']+)'")
WARMED_UP = re.compile(_STAMP + r" \S+ (\w+) -- warm-up image: (ok|error|failed)")


def replica_timeline(log_text: str) -> dict:
    """Engine scale decisions and each engine replica's warm-up (its id and when), from the server log."""
    decisions = [{"at": _epoch(m.group(1)), "added": int(m.group(2)), "deployment": m.group(3)}
                 for m in SCALE_DECISION.finditer(log_text)]
    warmed, seen = [], set()
    for m in WARMED_UP.finditer(log_text):
        if m.group(2) not in seen:
            seen.add(m.group(2))
            warmed.append({"at": _epoch(m.group(1)), "replica": m.group(2), "outcome": m.group(3)})
    return {"scale_decisions": decisions, "replicas_warmed_up": warmed}


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


async def rising_load(request, steps: list[tuple[int, float]], log_path: Path, *, replicas_wanted: int = 2,
                      wait_limit_s: float = 300, after_s: float = 60) -> dict:
    """Run the steps [(streams, seconds), ...]; the last one's seconds are its least: it lasts until
    `replicas_wanted` replicas warmed up (at most `wait_limit_s`), then `after_s` more.

    `request()` is an awaitable factory that sends one request and returns (latency_s, ttft_s); it raises
    on failure. Returns the request log, the timeline and per-step counts."""
    log: list[dict] = []
    active = 0
    stop = asyncio.Event()

    async def worker():
        nonlocal active
        active += 1
        while not stop.is_set():
            started, streams = time.time(), active
            entry = {"start": round(started, 3), "streams": streams}
            try:
                latency, ttft = await request()
                entry.update(outcome="ok", latency_s=round(latency, 3), ttft_s=round(ttft, 3))
            except Exception as exc:  # noqa: BLE001 - every failure is the measurement here, by kind
                entry.update(outcome=f"{type(exc).__name__}: {str(exc)[:200]}")
            entry["end"] = round(time.time(), 3)
            log.append(entry)

    tasks: list[asyncio.Task] = []
    began = time.time()
    step_marks = []
    for index, (streams, seconds) in enumerate(steps):
        step_marks.append({"at": round(time.time(), 3), "streams": streams})
        tasks += [asyncio.create_task(worker()) for _ in range(streams - len(tasks))]
        if index < len(steps) - 1:
            await asyncio.sleep(seconds)
            continue
        await asyncio.sleep(seconds)
        deadline = time.time() + wait_limit_s
        while time.time() < deadline:
            if len(replica_timeline(_read(log_path))["replicas_warmed_up"]) >= replicas_wanted:
                break
            await asyncio.sleep(2)
        await asyncio.sleep(after_s)
    stop.set()
    await asyncio.gather(*tasks)
    timeline = replica_timeline(_read(log_path))
    failed = [e for e in log if e["outcome"] != "ok"]
    return {"began": round(began, 3), "steps": step_marks, "requests": len(log), "failed": len(failed),
            "failures_by_kind": _count(e["outcome"] for e in failed), "timeline": timeline,
            "per_replica_phase": _phases(log, timeline), "request_log": sorted(log, key=lambda e: e["start"])}


def _phases(log: list[dict], timeline: dict) -> list[dict]:
    """Requests/s and latency at the top step, with one replica serving and after the second warmed up."""
    warmed = [w["at"] for w in timeline["replicas_warmed_up"]]
    second = warmed[1] if len(warmed) > 1 else None
    top = max((e["streams"] for e in log), default=0)
    log = [e for e in log if e["streams"] == top]
    phases = []
    for name, keep in (("one replica", lambda e: second is None or e["end"] < second),
                       ("two replicas", lambda e: second is not None and e["start"] >= second)):
        done = [e for e in log if keep(e) and e["outcome"] == "ok"]
        if not done:
            continue
        span = max(e["end"] for e in done) - min(e["start"] for e in done)
        latencies = sorted(e["latency_s"] for e in done)
        phases.append({"phase": name, "ok": len(done), "requests_per_s": round(len(done) / span, 2) if span else None,
                       "latency_p50_s": latencies[len(latencies) // 2],
                       "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]})
    return phases


def _count(values) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
