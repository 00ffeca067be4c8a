"""Rescore a results file written before 2026-11-27's change of rate: from its run logs, the whole-run
rate that bench.pipeline_run now reports (see its docstring for why).

    python -m bench.rescore_from_logs RESULTS.json LOG_DIR

The logs kept in docs/bench-results/*-logs/ are cut to the lines this reads (and vLLM's engine
statistics). Those runs did not keep each row's engine latency, but their logs hold Ray's "Elapsed time for batch"
lines: the first batch out spent that long in the engine stage, and it entered when the engine became
ready. So the whole run is the time from the first row out to the end (`wall_s_including_startup` minus
`first_output_after_s`, which adds the few ms after the last row), plus that first batch's time. The
old rate moves to `requests_per_s_10_90`; a run without a log is left as it is, and said so.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FIRST_BATCH = re.compile(r"Elapsed time for batch \S+ with size \d+: ([0-9.]+)")


def rescore(run: dict, log_text: str | None) -> dict:
    if not run.get("engine", "").startswith("pipeline") or "requests_per_s_10_90" in run:
        return run  # plain vLLM's rate was always all requests over all their time
    found = FIRST_BATCH.search(log_text or "")
    if found is None or run.get("first_output_after_s") is None:
        return {**run, "rate_note": "10%-90% window (biased by waves); no run log to rescore it"}
    in_engine = float(found.group(1)) + run["wall_s_including_startup"] - run["first_output_after_s"]
    rate = run["n"] / in_engine
    return {**run, "requests_per_s_10_90": run["requests_per_s"], "requests_per_s": round(rate, 2),
            "generated_tokens_per_s": round(run["generated_tokens_per_s"] * rate / run["requests_per_s"], 1),
            "first_row_out_after_entering_s": round(float(found.group(1)), 1),
            "rate_note": "whole run, rescored from the run log (bench/rescore_from_logs.py)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("logs", type=Path)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    runs = []
    for run in results["runs"]:
        log = args.logs / f"{run.get('label')}.log"
        runs.append(rescore(run, log.read_text(errors="replace") if log.exists() else None)
                    if run.get("workload") == "W1" else run)
    args.results.write_text(json.dumps({**results, "runs": runs}, indent=1) + "\n")
    for run in runs:
        if run.get("workload") == "W1":
            print(f"{run['label']:48s} {run.get('requests_per_s_10_90', ''):>7} -> {run['requests_per_s']}")


if __name__ == "__main__":
    main()
