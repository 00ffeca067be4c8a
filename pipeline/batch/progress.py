"""A running job's status line: rows done, rows/s, tokens/s, errors by kind and ETA, every few seconds.

Ray Data's progress bars show each operator's rows; what they do not show is the run as an operator
thinks of it (how many images are captioned, how fast, how many failed and why, when it will end).

How the driver learns it, cheaply and on any cluster size:
- `observe(dataset)` appends one fused map stage after the rows are finalised. It tallies each batch
  (rows, errors by kind, tokens) and sends the tally, fire-and-forget, to one small counter actor
  (`num_cpus=0`), and records the same numbers as Ray metrics (pipeline/batch/metrics.py). One actor call per
  batch; the batch itself passes through untouched.
- A daemon thread on the driver asks the actor for its totals every `report.status_interval_s` and
  logs one line. The write call (`write_parquet`, `write_datasink`) blocks the main thread meanwhile.
- The total comes from the input plan (the rows, or request lines, that the run still has to do), which
  is what makes an ETA. Both batch formats go through it (pipeline.batch.skeleton).

The counts are live estimates: a batch whose task Ray retries after tallying is counted twice. The
manifest, read back from the written output, stays the authoritative record.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io import records as R
from pipeline.config import PipelineConfig
from pipeline.batch.metrics import PipelineMetrics

logger = logging.getLogger(__name__)

# Rates and the ETA use the last few minutes, so a slow start-up (model load) does not skew them.
RATE_WINDOW_S = 300.0


def empty_tally() -> dict[str, Any]:
    return {"rows": 0, "ok": 0, "errors": 0, "errors_by_kind_stage": {}, "prompt_tokens": 0,
            "completion_tokens": 0}


# The (error kind, error stage) columns of a parquet job's output rows; another format names its own
# (pipeline.batch.skeleton's `BatchFormat.error_columns`). Tokens are `prompt_tokens`/`completion_tokens` in both.
ERROR_COLUMNS = (R.ERROR_KIND, R.ERROR_STAGE)


def tally_batch(batch: pa.Table, error_columns: tuple[str, str] = ERROR_COLUMNS) -> tuple[dict[str, Any], list[float]]:
    """Counts of one batch of output rows, and the engine latencies of its answered rows."""
    tally = empty_tally()
    tally["rows"] = batch.num_rows
    kinds = batch[error_columns[0]].to_pylist()
    stages = batch[error_columns[1]].to_pylist()
    for kind, stage in zip(kinds, stages):
        if kind is not None:
            key = (kind, stage or "unknown")
            tally["errors_by_kind_stage"][key] = tally["errors_by_kind_stage"].get(key, 0) + 1
    tally["errors"] = sum(tally["errors_by_kind_stage"].values())
    tally["ok"] = tally["rows"] - tally["errors"]
    tally["prompt_tokens"] = pc.sum(batch[R.PROMPT_TOKENS]).as_py() or 0
    tally["completion_tokens"] = pc.sum(batch[R.COMPLETION_TOKENS]).as_py() or 0
    latencies = [v for v in batch[R.ENGINE_LATENCY_S].to_pylist() if v is not None] \
        if R.ENGINE_LATENCY_S in batch.column_names else []
    return tally, latencies


def merge_tally(total: dict[str, Any], tally: dict[str, Any]) -> dict[str, Any]:
    for key in ("rows", "ok", "errors", "prompt_tokens", "completion_tokens"):
        total[key] += tally[key]
    for key, count in tally["errors_by_kind_stage"].items():
        total["errors_by_kind_stage"][key] = total["errors_by_kind_stage"].get(key, 0) + count
    return total


class RunCounter:
    """The counter actor's class (made a Ray actor by `RunProgress`): the run's totals so far."""

    def __init__(self):
        self.totals = empty_tally()

    def add(self, tally: dict[str, Any]) -> None:
        merge_tally(self.totals, tally)

    def snapshot(self) -> dict[str, Any]:
        return self.totals


class TallyRows:
    """Ray Data map over finalised output rows: count them (counter actor, Ray metrics), pass them on."""

    def __init__(self, counter: Any, metrics: PipelineMetrics, error_columns: tuple[str, str] = ERROR_COLUMNS):
        self.counter = counter
        self.metrics = metrics
        self.error_columns = error_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        tally, latencies = tally_batch(batch, self.error_columns)
        self.counter.add.remote(tally)  # fire-and-forget: a lost update only makes the line lag
        self.metrics.record(tally, latencies)
        return batch


class StatusLine:
    """Formats the status line from the counter's totals; keeps the samples that the rates need."""

    def __init__(self, total_rows: int, started_s: float, window_s: float = RATE_WINDOW_S):
        self.total_rows = total_rows
        self.started_s = started_s
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def update(self, now_s: float, totals: dict[str, Any], final: str = "") -> str:
        """The line for the counter's `totals` at `now_s`; `final` ("done", "stopped") gives the whole
        run's rates and no ETA."""
        rows = min(totals["rows"], self.total_rows) if self.total_rows else totals["rows"]
        if rows == 0:
            self.samples.clear()  # rates start when rows start, not during the engine's start-up
        self.samples.append((now_s, rows, totals["completion_tokens"]))
        while len(self.samples) > 2 and now_s - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        elapsed = now_s - self.started_s
        share = f" ({100.0 * rows / self.total_rows:.1f}%)" if self.total_rows else ""
        parts = [f"{final or 'progress'}: {rows:,}/{self.total_rows:,} rows{share}"]
        first_t, first_rows, first_tokens = (self.started_s, 0, 0) if final else self.samples[0]
        span = now_s - first_t
        if rows == 0:
            parts.append("waiting for the first rows (engine start-up)")
        elif span > 0 and rows > first_rows:
            rows_per_s = (rows - first_rows) / span
            tokens_per_s = (totals["completion_tokens"] - first_tokens) / span
            window = "whole run" if final else f"last {_duration(span)}"
            parts.append(f"{rows_per_s:,.1f} rows/s, {tokens_per_s:,.0f} generated tokens/s ({window})")
        parts.append(self._errors(totals))
        parts.append(f"elapsed {_duration(elapsed)}")
        if not final:
            parts.append(self._eta(rows, span, first_rows))
        return " | ".join(p for p in parts if p)

    def _errors(self, totals: dict[str, Any]) -> str:
        if not totals["errors"]:
            return "errors 0"
        by_kind: collections.Counter[str] = collections.Counter()
        for (kind, _stage), count in totals["errors_by_kind_stage"].items():
            by_kind[kind] += count
        listed = ", ".join(f"{kind} {count:,}" for kind, count in by_kind.most_common(4))
        more = f", {len(by_kind) - 4} more kinds" if len(by_kind) > 4 else ""
        return f"errors {totals['errors']:,}: {listed}{more}"

    def _eta(self, rows: int, span: float, first_rows: int) -> str:
        if not self.total_rows:
            return ""
        if rows >= self.total_rows:
            return "ETA 0s (writing the last files)"
        if span <= 0 or rows <= first_rows:
            return "ETA unknown"
        rate = (rows - first_rows) / span
        return f"ETA {_duration((self.total_rows - rows) / rate)}"


def _duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RunProgress:
    """Context manager around a run's write: the counter actor, the tally stage, the status thread.

        with RunProgress(config, plan.num_rows) as progress:
            progress.observe(dataset).write_parquet(...)
    """

    def __init__(self, config: PipelineConfig, total_rows: int, clock: Callable[[], float] = time.monotonic,
                 error_columns: tuple[str, str] = ERROR_COLUMNS):
        self.interval_s = config.report.status_interval_s
        self.error_columns = error_columns
        self.metrics = PipelineMetrics(config.model.served_name)
        self.clock = clock
        self.line = StatusLine(total_rows, clock())
        self.counter: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RunProgress":
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node, like the row ledger (pipeline/stages/crash_isolation.py): placed anywhere, it could land on
        # an engine node, and a preempted node would take the status line down for the rest of the run.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.counter = ray.remote(num_cpus=0)(RunCounter).options(scheduling_strategy=here).remote()
        self._thread = threading.Thread(target=self._loop, name="run-status", daemon=True)
        self._thread.start()
        return self

    def observe(self, dataset):
        """The dataset with the tally stage appended (a task map that Ray fuses with the one before)."""
        return dataset.map_batches(TallyRows(self.counter, self.metrics, self.error_columns), batch_format="pyarrow",
                                   batch_size=None, zero_copy_batch=True)

    def __exit__(self, *exc_info) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 10)
        if exc_info[0] is None:
            self._settle()
        self._log_status(final="done" if exc_info[0] is None else "stopped")
        ray.kill(self.counter)

    def _settle(self, timeout_s: float = 5.0) -> None:
        """Wait briefly for tallies still in flight: the last tasks' fire-and-forget calls may reach the
        actor after the write returned."""
        import ray

        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            try:
                if ray.get(self.counter.snapshot.remote(), timeout=10)["rows"] >= self.line.total_rows:
                    return
            except Exception:
                return
            time.sleep(0.2)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._log_status()

    def _log_status(self, final: str = "") -> None:
        import ray

        try:
            totals = ray.get(self.counter.snapshot.remote(), timeout=30)
        except Exception as exc:  # the status line must never take the run down with it
            logger.warning("status unavailable: %s: %s", type(exc).__name__, exc)
            return
        logger.info("%s", self.line.update(self.clock(), totals, final=final))
