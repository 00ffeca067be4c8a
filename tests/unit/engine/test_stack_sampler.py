"""The host-time sampler (pipeline/engine/stack_sampler.py) and its report (bench/stack_report.py): a process
whose main thread burns time in one known function must show that function as its top frame."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.stack_report import load_windows, render, thread_profile
from pipeline.engine import stack_sampler

ROOT = Path(__file__).resolve().parents[3]


def busy_loop_for_the_sampler(seconds: float) -> int:
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def test_sampler_writes_windows_that_name_the_busy_function(tmp_path):
    thread = stack_sampler.start(tmp_path, interval_s=0.005, window_s=0.25, windows=2)
    assert stack_sampler.start(tmp_path) is None  # once per process
    busy_loop_for_the_sampler(0.7)
    thread.join(timeout=5)

    windows = [json.loads(line) for line in (tmp_path / f"{os.getpid()}.jsonl").read_text().splitlines()]
    assert len(windows) == 2 and all(w["pid"] == os.getpid() and w["samples"] > 10 for w in windows)
    own, inclusive, total = thread_profile(windows, "MainThread")
    top_frame, count = own.most_common(1)[0]
    assert top_frame.startswith("busy_loop_for_the_sampler (test_stack_sampler.py:")
    assert count > 0.8 * total
    assert any(f.startswith("test_sampler_writes_windows") for f in inclusive)
    # The sampler does not count itself.
    assert not any("pipeline-stack-sampler" in s for w in windows for s in w["stacks"])


def test_report_keeps_the_named_process_and_leaves_out_start_up(tmp_path):
    def window(pid, process, start, stacks):
        return json.dumps({"pid": pid, "process": process, "start": start, "end": start + 10, "samples": 100,
                           "stacks": stacks})
    engine = [window(7, "VLLM::EngineCor", t, {"MainThread;main (a.py:1);compile (b.py:2)": 100})
              for t in (0, 10)]
    engine += [window(7, "VLLM::EngineCor", t, {"MainThread;main (a.py:1);step (c.py:3);sync (c.py:9)": 60,
                                                "MainThread;main (a.py:1);step (c.py:3)": 40,
                                                "Thread-1;wait (t.py:1)": 100}) for t in (20, 30, 40)]
    (tmp_path / "7.jsonl").write_text("\n".join(engine) + "\n")
    (tmp_path / "8.jsonl").write_text(window(8, "ray::Actor", 0, {"MainThread;other (o.py:1)": 100}) + "\n")

    assert list(load_windows(tmp_path, "VLLM::EngineCor")) == [7]
    report = render(tmp_path, "VLLM::EngineCor", "MainThread", skip=2, top=5)
    # Windows 20 and 30 are kept: the two start-up windows are skipped, and the last (cut short) too.
    assert "2 windows, 20 s, 200 samples" in report
    assert " 60.0%  sync (c.py:9)" in report and "100.0%  step (c.py:3)" in report
    assert "compile" not in report and "other" not in report


def test_plugin_starts_the_sampler_in_a_vllm_process_when_asked(tmp_path):
    code = ("from pipeline.engine.plugin import register; register(); "
            "import pipeline.engine.stack_sampler as s, time, os; assert os.getpid() in s._started; time.sleep(0.1)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), stack_sampler.ENV_DIRECTORY: str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    env.pop(stack_sampler.ENV_DIRECTORY)
    off = code.replace("assert os.getpid() in s._started", "assert not s._started")
    subprocess.run([sys.executable, "-c", off], env=env, check=True, timeout=120)
