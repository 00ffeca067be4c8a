"""The job-level benchmark's arithmetic: the steady-state window, how far preparation ran ahead, cost.

Pure functions over what a run recorded (bench/job_run.py): the job's output lines, each with the time it
arrived, and the `finished_at` of every output row. Unit-tested in tests/unit/bench/test_bench_job_window.py.

Where the job exposes preparation: Ray Data's own progress log. With stdout not a terminal, Ray Data logs
every operator's `row_outputs_taken` (rows it produced that the next operator took) every
RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL seconds (job_run sets 2), one line per operator:

    ... INFO logging_progress.py:231 -- Project->MapBatches(PrepareRecords): 4096/10000

The prepare stage is the operator named after `PrepareRecords` (fetch, decode, resize), the engine the one
named after the engine UDF (`...EngineUDF`, `vLLMEngineStage...`). One refresh logs every operator within
milliseconds, so a prepare line and the engine line after it make one snapshot: (time, rows prepared,
rows out of the engine). Ahead = prepared - generated: rows prepared and not yet answered (waiting
between the stages or inside the engine).

The window: preparation and engine both run from the first row out of the job (the engine is up and
answering) to the last snapshot at which preparation had not yet handed on every row. Its rate counts the
rows whose `finished_at` falls in it, between two output instants (rows come out in batches; W1's
fixed-length outputs make the engine finish them in waves of up to `max_num_seqs`, so a window that cut a
wave would count part of it: `wave_bias` bounds that error as one wave over the window's length). When
preparation had handed on every row before the first row came out, there is no such window: the result
says so (`prepared_before_window`) and rates the engine's run from first to last row out instead.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from typing import Iterable, Optional

PROGRESS = re.compile(r"logging_progress\.py:\d+ -- (?P<name>.+): (?P<done>\d+)/(?P<total>\d+|\?)\s*$")
PREPARE_OP = ("PrepareRecords",)
ENGINE_OP = ("EngineUDF", "vLLMEngineStage")


def progress_snapshots(lines: Iterable[tuple[float, str]]) -> list[tuple[float, int, int]]:
    """(time, rows prepared, rows out of the engine) from the job's (arrival time, line) pairs."""
    snapshots, prepared = [], None
    for t, line in lines:
        match = PROGRESS.search(line)
        if not match:
            continue
        name, done = match["name"], int(match["done"])
        if any(key in name for key in PREPARE_OP):
            prepared = done
        elif any(key in name for key in ENGINE_OP) and prepared is not None:
            snapshots.append((t, prepared, done))
            prepared = None
    return snapshots


def output_instants(finished_at: Iterable[float]) -> list[tuple[float, int]]:
    """(time, rows) per distinct output time, in order."""
    counts: dict[float, int] = {}
    for t in finished_at:
        counts[t] = counts.get(t, 0) + 1
    return sorted(counts.items())


def _snapshot_at(snapshots: list[tuple[float, int, int]], t: float) -> Optional[tuple[float, int, int]]:
    """The last snapshot at or before t (the first one if none is)."""
    if not snapshots:
        return None
    i = bisect_right([s[0] for s in snapshots], t)
    return snapshots[max(i - 1, 0)]


def _ahead(snapshot: Optional[tuple[float, int, int]]) -> Optional[dict]:
    if snapshot is None:
        return None
    t, prepared, generated = snapshot
    return {"prepared": prepared, "generated": generated, "ahead": prepared - generated}


# A span shorter than this (rows of one batch stamped milliseconds apart) has no meaningful rate.
MIN_SPAN_S = 1.0


def rate_between(instants: list[tuple[float, int]], start: float, end: float) -> dict:
    """Rows out per second between the first and last output instants inside [start, end]: the rows
    that came out after the first of them, up to and including the last."""
    inside = [(t, n) for t, n in instants if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < MIN_SPAN_S:
        return {"rows": 0, "seconds": 0.0, "rows_per_s": None, "opened_s": None, "closed_s": None}
    opened, closed = inside[0][0], inside[-1][0]
    rows = sum(n for _, n in inside[1:])
    return {"rows": rows, "seconds": round(closed - opened, 2), "rows_per_s": round(rows / (closed - opened), 3),
            "opened_s": opened, "closed_s": closed}


def steady_window(snapshots: list[tuple[float, int, int]], finished_at: list[float], total: int,
                  max_num_seqs: int, origin: float = 0.0) -> dict:
    """The steady-state window of one job (times in seconds on one clock; `origin`, the job's start, makes
    the reported times relative to it)."""
    instants = output_instants(finished_at)
    if not instants:
        return {"kind": "no rows out", "rows_per_s": None, "prepared_before_window": None}
    first_out, last_out = instants[0][0], instants[-1][0]
    still_preparing = [s for s in snapshots if s[1] < total]
    close = still_preparing[-1][0] if still_preparing else None
    done = next((s[0] for s in snapshots if s[1] >= total), None)
    flagged = close is None or close <= first_out
    if flagged:
        kind, window = "engine only: preparation was done before the window opened", (first_out, last_out)
    else:
        kind, window = "preparation and engine both running", (first_out, close)
    rated = rate_between(instants, *window)
    in_window = [s for s in snapshots if window[0] <= s[0] <= window[1]]
    aheads = [s[1] - s[2] for s in in_window]
    rel = lambda t: None if t is None else round(t - origin, 2)  # noqa: E731
    seconds = rated["seconds"]
    return {"kind": kind, "prepared_before_window": flagged,
            "open_s": rel(window[0]), "close_s": rel(window[1]),
            # The rate's span: the first and last output instants inside the window.
            "rated_from_s": rel(rated["opened_s"]), "rated_to_s": rel(rated["closed_s"]),
            "seconds": seconds, "rows": rated["rows"], "rows_per_s": rated["rows_per_s"],
            "wave_bias": round(max_num_seqs / seconds / rated["rows_per_s"], 3)
            if seconds and rated["rows_per_s"] else None,
            "at_open": _ahead(_snapshot_at(snapshots, window[0])),
            "at_close": _ahead(_snapshot_at(snapshots, window[1])),
            "ahead_max": max(aheads) if aheads else None, "ahead_min": min(aheads) if aheads else None,
            "first_row_out_s": rel(first_out), "last_row_out_s": rel(last_out),
            "preparation_done_s": rel(done), "snapshots": len(snapshots)}


def usd_per_million(images_per_s: Optional[float], gpu_hourly_usd: Optional[float], gpus: int = 1) -> Optional[float]:
    """$ per 1M images at `gpu_hourly_usd` per GPU-hour, `gpus` GPUs busy for the whole time."""
    if not images_per_s or gpu_hourly_usd is None:
        return None
    return round(gpu_hourly_usd * gpus / 3600.0 / images_per_s * 1e6, 2)


def job_rates(rows: int, wall_s: float, engine_start_s: Optional[float], gpu_hourly_usd: Optional[float],
              gpus: int = 1) -> dict:
    """Images/s and $ per 1M images over the whole job, and over the job less its engine start."""
    whole = rows / wall_s if wall_s > 0 else None
    after = rows / (wall_s - engine_start_s) if engine_start_s is not None and wall_s > engine_start_s else None
    return {"images_per_s": round(whole, 3) if whole else None,
            "images_per_s_after_start": round(after, 3) if after else None,
            "usd_per_1m_images": usd_per_million(whole, gpu_hourly_usd, gpus),
            "usd_per_1m_images_after_start": usd_per_million(after, gpu_hourly_usd, gpus)}
