"""Read the host-time samples of `pipeline.engine.stack_sampler` (the benchmark's `stacks` knob): where one
process's thread spends its time, over the windows of the steady state.

    python -m bench.stack_report DIR [--process VLLM::] [--thread MainThread] [--skip 6] [--top 25]

It prints, as shares of the thread's samples: the innermost frames ("self"), and every function a
sample passes through ("inclusive"), the latter being the one to read for "how much of the step is
`_prepare_inputs`". Process names are /proc/PID/comm, which Linux cuts to 15 characters.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def load_windows(directory: Path, process: str | None) -> dict[int, list[dict]]:
    """pid -> its windows in time order, for the processes whose name starts with `process`."""
    by_pid: dict[int, list[dict]] = {}
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            window = json.loads(line)
            if process is None or window["process"].startswith(process):
                by_pid.setdefault(window["pid"], []).append(window)
    return {pid: sorted(windows, key=lambda w: w["start"]) for pid, windows in by_pid.items()}


def thread_profile(windows: list[dict], thread: str) -> tuple[Counter, Counter, int]:
    """(self counts, inclusive counts, samples) of one thread over the given windows."""
    own, inclusive, total = Counter(), Counter(), 0
    for window in windows:
        for stack, count in window["stacks"].items():
            name, _, frames = stack.partition(";")
            if name != thread:
                continue
            total += count
            chain = frames.split(";")
            own[chain[-1]] += count
            for function in set(chain):  # a recursive function counts once per sample
                inclusive[function] += count
    return own, inclusive, total


def render(directory: Path, process: str | None, thread: str, skip: int, top: int) -> str:
    lines = []
    for pid, windows in load_windows(directory, process).items():
        steady = windows[skip:-1] if len(windows) > skip + 1 else windows
        own, inclusive, total = thread_profile(steady, thread)
        if not total:
            continue
        seconds = sum(w["end"] - w["start"] for w in steady)
        lines.append(f"## pid {pid} ({windows[0]['process']}), thread {thread}: {len(steady)} windows, "
                     f"{seconds:.0f} s, {total} samples")
        for title, counts in (("self", own), ("inclusive", inclusive)):
            lines.append(f"### {title}")
            lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in counts.most_common(top)]
    return "\n".join(lines) or f"no samples of thread {thread!r} in {directory}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--process", default="VLLM::", help="process name prefix; '' for all")
    parser.add_argument("--thread", default="MainThread")
    parser.add_argument("--skip", type=int, default=0, help="leading windows to leave out (start-up)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(render(args.directory, args.process or None, args.thread, args.skip, args.top))


if __name__ == "__main__":
    main()
