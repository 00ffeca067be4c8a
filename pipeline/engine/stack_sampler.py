"""Where does a vLLM process spend its host time? A sampling profiler that runs inside the process.

The engine decodes ~250 image requests per step in 43-48 ms on an H100 or H200, of which its kernels take
~27 ms (docs/performance.md, "Where the time goes with images"): the rest is host time, and this module
is how we see it on a GPU machine. py-spy would need ptrace rights, which a lent container need not
grant, and a torch trace shows kernels, not which Python line keeps the GPU waiting. So a daemon thread
reads `sys._current_frames()` every `interval_s` and counts each thread's stack; every `window_s` it
appends the window's counts to `<directory>/<pid>.jsonl` and starts afresh. Windows, not one total, so
that a report can keep the steady state and leave out start-up and compilation.

Switched on by PIPELINE_STACK_SAMPLES=<directory> (our vLLM plugin starts it in every vLLM process, the
benchmark's `stacks` knob sets it). Cost: one GIL hand-over per sample, ~1% at 100 Hz.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ENV_DIRECTORY = "PIPELINE_STACK_SAMPLES"
_started: set[int] = set()  # pids that run a sampler: vLLM calls its plugins more than once per process


def stack_of(frame) -> str:
    """'outer (file:line);...;inner (file:line)': root first, as flame-graph tools read it."""
    parts = []
    while frame is not None:
        code = frame.f_code
        parts.append(f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})")
        frame = frame.f_back
    return ";".join(reversed(parts))


def sample_once(counts: Counter, skip: int) -> None:
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        if ident != skip:
            counts[f"{names.get(ident, ident)};{stack_of(frame)}"] += 1


def _run(path: Path, interval_s: float, window_s: float, windows: int | None) -> None:
    me = threading.get_ident()
    counts: Counter = Counter()
    started, samples, written = time.time(), 0, 0
    while windows is None or written < windows:
        time.sleep(interval_s)
        sample_once(counts, me)
        samples += 1
        if time.time() - started >= window_s:
            record = {"pid": os.getpid(), "process": _process_name(), "start": started, "end": time.time(),
                      "samples": samples, "stacks": dict(counts)}
            with path.open("a") as out:
                out.write(json.dumps(record) + "\n")
            counts, started, samples, written = Counter(), time.time(), 0, written + 1


def _process_name() -> str:
    try:
        return Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    except OSError:
        return sys.argv[0]


def start(directory: str | os.PathLike, interval_s: float = 0.01, window_s: float = 10.0,
          windows: int | None = None) -> threading.Thread | None:
    """Start this process's sampler (once per process); None if it already runs."""
    if os.getpid() in _started:
        return None
    _started.add(os.getpid())
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    thread = threading.Thread(target=_run, args=(path / f"{os.getpid()}.jsonl", interval_s, window_s, windows),
                              name="pipeline-stack-sampler", daemon=True)
    thread.start()
    return thread


def start_from_env() -> bool:
    directory = os.environ.get(ENV_DIRECTORY)
    if not directory:
        return False
    start(directory)
    return True
