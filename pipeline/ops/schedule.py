"""Scheduled incremental captioning: each tick captions the input files no earlier tick captioned.

    run_tick(request, runner)          one tick: list, claim, caption, record (pipeline.ops.ledger)
    run_schedule(cron, tick)           call `tick` at every time the cron expression names
    InProcessRunner / SubmittedRunner  caption a tick's files here (embedded or joined Ray) or as a Ray job

A tick lists the parquet files under the input prefix, drops those the ledger marks done, claims the rest
(up to `max_files`), and captions exactly the claimed files into OUTPUT/runs/<run_id>/, a fresh prefix per
tick (so the caption job's refusal to overwrite never gets in the way). While the caption runs, the tick
renews its run record's heartbeat; when it succeeds the files are marked done, when it fails the run is
marked failed, its partial output deleted, and the next tick claims the files again. A run whose owner
vanished (heartbeat older than the lease) is settled by the next tick that meets one of its files: done
when its output has a manifest, still running when its Ray job says so, failed otherwise.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Protocol

from pipeline.batch.caption import MANIFEST_NAME
from pipeline.config import PipelineConfig, StorageSection
from pipeline.ops.ledger import FAILED, RUNNING, SUCCEEDED, InputFile, Ledger, list_input_files, open_store
from pipeline.io.storage import is_s3, join, make_filesystem, read_json

logger = logging.getLogger(__name__)


class ScheduleError(ValueError):
    """The schedule cannot run as asked (overlapping prefixes, invalid cron expression)."""


class RunFailed(RuntimeError):
    """The caption run of a tick failed; its files are retried by the next tick."""


@dataclass
class TickRequest:
    input_uri: str
    output_uri: str
    storage: StorageSection
    lease_s: float = 900.0
    max_files: Optional[int] = None


@dataclass
class CaptionRun:
    """What a runner captions: exactly `files`, listed at `input_list_uri`, into `output_uri`."""

    run_id: str
    files: list[InputFile]
    input_list_uri: str
    output_uri: str


@dataclass
class TickResult:
    status: str  # "idle" (nothing to do), "succeeded" or "failed"
    listed: int = 0
    new: int = 0
    claimed: int = 0
    in_flight: int = 0
    run_id: Optional[str] = None
    output: Optional[str] = None
    error: Optional[str] = None
    summary: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    mode: str

    def run(self, run: CaptionRun, on_submitted: Callable[[dict[str, str]], None]) -> dict[str, Any]:
        """Caption the run's files; return a summary; raise on failure."""


# ------------------------------------------------------------------ runners
class InProcessRunner:
    """Captions in this process: an embedded local Ray, or the cluster this process runs on (a RayCronJob's
    entrypoint, `ray job submit -- python -m jobs.schedule --once`)."""

    mode = "in-process"

    def __init__(self, config: PipelineConfig):
        self.config = config

    def run(self, run: CaptionRun, on_submitted: Callable[[dict[str, str]], None]) -> dict[str, Any]:
        from pipeline.batch.caption import run_caption

        manifest = run_caption(self.config, [f.uri for f in run.files], run.output_uri)
        return {**manifest["counts"], **manifest["throughput"]}


class SubmittedRunner:
    """Submits `python -m jobs.caption --input-list ... --output ...` as a Ray job and waits for it.

    `template` carries the working directory, runtime_env and entrypoint resources; `caption_args` the
    job's own arguments (--config, --model, --set). Interrupted while waiting, it stops the job, so that
    a retry never runs beside it.
    """

    mode = "ray-job"

    def __init__(self, address: Optional[str], template, caption_args: list[str], python: str = "python",
                 token: Optional[str] = None):
        self.address, self.template, self.caption_args, self.python = address, template, caption_args, python
        self.token = token

    def run(self, run: CaptionRun, on_submitted: Callable[[dict[str, str]], None]) -> dict[str, Any]:
        from pipeline.ops.submit import job_client, job_failure_summary, submit_job, wait_for_job

        entrypoint = [self.python, "-m", "jobs.caption", "--input-list", run.input_list_uri,
                      "--output", run.output_uri, *self.caption_args]
        request = replace(self.template, entrypoint=entrypoint, submission_id=f"caption-{run.run_id}",
                          metadata={**self.template.metadata, "schedule_run_id": run.run_id})
        client = job_client(self.address, self.token)
        submission_id = submit_job(client, request)
        on_submitted({"address": self.address or "", "submission_id": submission_id})
        try:
            status = wait_for_job(client, submission_id)
        except BaseException:
            logger.warning("interrupted: stopping Ray job %s", submission_id)
            client.stop_job(submission_id)
            raise
        if status != "SUCCEEDED":
            raise RunFailed(f"Ray job {submission_id} {job_failure_summary(client, submission_id)}")
        return {"submission_id": submission_id}


def query_job_state(job: dict[str, str], token: Optional[str] = None) -> Optional[str]:
    """RUNNING, SUCCEEDED or FAILED for a recorded Ray job; None when its cluster cannot be asked."""
    from pipeline.ops.submit import SubmitError, job_client, job_status

    try:
        status = job_status(job_client(job.get("address") or None, token), job["submission_id"])
    except SubmitError:
        return None
    except RuntimeError:  # the job API answered, but knows no such job: its cluster is gone
        return FAILED
    return {"PENDING": RUNNING, "RUNNING": RUNNING, "SUCCEEDED": SUCCEEDED}.get(status, FAILED)


# ------------------------------------------------------------------ one tick
class RunResolver:
    """What became of the run behind a claim; settles runs whose owner vanished (see module docstring)."""

    def __init__(self, ledger: Ledger, storage: StorageSection,
                 job_state: Callable[[dict[str, str]], Optional[str]] = query_job_state):
        self.ledger, self.storage, self.job_state = ledger, storage, job_state
        self._known: dict[str, Optional[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, run_id: str) -> Optional[str]:
        with self._lock:  # claims resolve in parallel; settle each run once
            if run_id not in self._known:
                record = self.ledger.read_run(run_id)
                if record is not None and self.ledger.is_stale(record):
                    record = self._settle(record)
                self._known[run_id] = None if record is None else record["status"]
            return self._known[run_id]

    def _settle(self, record: dict[str, Any]) -> dict[str, Any]:
        if read_json(self.storage, join(record["output"], MANIFEST_NAME)) is not None:
            status, note = SUCCEEDED, "settled: its output has a manifest"
        elif record.get("job") and self.job_state(record["job"]) in (RUNNING, None):
            logger.info("run %s: no heartbeat, but its Ray job is running (or cannot be asked)", record["run_id"])
            return record
        else:
            status, note = FAILED, "settled: lease expired without a heartbeat and without output"
        logger.warning("run %s %s -> %s", record["run_id"], note, status)
        record = {**record, "status": status, "error": record.get("error") or note, "settled_at": self.ledger.clock()}
        if status == SUCCEEDED:
            files = [InputFile(f["uri"], f["version"], f["size"]) for f in record.get("files", [])]
            self.ledger.mark_done(files, record["run_id"])
        else:
            _discard_output(self.storage, record["output"])
        self.ledger.write_run(record)
        return record


class Heartbeat:
    """Renews a run record's `heartbeat_at` from a thread while the caption runs; writes the final record."""

    def __init__(self, ledger: Ledger, record: dict[str, Any], interval_s: float):
        self.ledger, self.record, self.interval_s = ledger, record, interval_s
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{record['run_id']}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.record.update(fields, heartbeat_at=self.ledger.clock())
            self.ledger.write_run(self.record)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.update()
            except Exception as exc:  # a missed beat is survivable; the lease allows several
                logger.warning("run %s: heartbeat failed: %s", self.record["run_id"], exc)


def run_tick(request: TickRequest, runner: Runner, *, clock: Callable[[], float] = time.time,
             job_state: Callable[[dict[str, str]], Optional[str]] = query_job_state) -> TickResult:
    """One tick; a failed caption run gives status "failed" (the files are retried next tick)."""
    check_prefixes(request.input_uri, request.output_uri)
    ledger = Ledger(open_store(request.storage, request.output_uri), lease_s=request.lease_s, clock=clock)
    ledger.check_exclusive_create()
    files = list_input_files(request.storage, request.input_uri)
    done = ledger.done_keys()
    candidates = [f for f in files if f.key not in done]
    result = TickResult("idle", listed=len(files), new=len(candidates))
    if not candidates:
        logger.info("tick: %d files under %s, all captioned", len(files), request.input_uri)
        return result
    run_id = new_run_id(clock())
    outcome = ledger.claim(candidates, run_id, RunResolver(ledger, request.storage, job_state), limit=request.max_files)
    result.in_flight = outcome.in_flight
    if not outcome.claimed:
        logger.info("tick: %d new files, none free (%d held by running ticks, %d lost to a concurrent tick)",
                    len(candidates), outcome.in_flight, outcome.lost)
        return result
    claimed = outcome.claimed
    output = join(request.output_uri, f"runs/{run_id}")
    now = clock()
    record = {"run_id": run_id, "status": RUNNING, "mode": runner.mode, "host": socket.gethostname(),
              "input": request.input_uri, "output": output, "started_at": now, "heartbeat_at": now,
              "lease_s": request.lease_s, "job": None, "files": [f.as_dict() for f in claimed]}
    ledger.write_run(record)
    run = CaptionRun(run_id, claimed, ledger.write_inputs(run_id, claimed), output)
    logger.info("tick %s: captioning %d of %d new files (%d held by running ticks) into %s (%s)", run_id,
                len(claimed), len(candidates), outcome.in_flight, output, runner.mode)
    result.run_id, result.output, result.claimed = run_id, output, len(claimed)
    with Heartbeat(ledger, record, interval_s=min(60.0, request.lease_s / 4)) as heartbeat:
        try:
            summary = runner.run(run, on_submitted=lambda job: heartbeat.update(job=job))
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.error("tick %s failed; its %d files are retried next tick: %s", run_id, len(claimed), error)
            _discard_output(request.storage, output)
            heartbeat.update(status=FAILED, error=error[-4000:], finished_at=clock())
            if not isinstance(exc, Exception):
                raise
            result.status, result.error = "failed", error
            return result
        ledger.mark_done(claimed, run_id)
        heartbeat.update(status=SUCCEEDED, summary=summary, finished_at=clock())
    logger.info("tick %s succeeded: %d files -> %s", run_id, len(claimed), output)
    result.status, result.summary = "succeeded", summary
    return result


def new_run_id(now: float) -> str:
    """Sortable and unique: the UTC start time and a random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]


def check_prefixes(input_uri: str, output_uri: str) -> None:
    """Refuse an output inside the input (its parquet files would become inputs) or the reverse."""
    def normal(uri: str) -> str:
        if is_s3(uri):
            return uri.rstrip("/") + "/"
        from pathlib import Path

        return str(Path(uri[len("file://"):] if uri.startswith("file://") else uri).resolve()) + "/"

    source, target = normal(input_uri), normal(output_uri)
    if source.startswith(target) or target.startswith(source):
        raise ScheduleError(f"input {input_uri} and output {output_uri} overlap: the output's parquet files "
                            "would be listed as inputs; use separate prefixes")


def _discard_output(storage: StorageSection, output_uri: str) -> None:
    """Delete a failed run's partial output, so readers of OUTPUT/runs/ never count its rows."""
    fs, path = make_filesystem(storage, output_uri)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError) as exc:
        logger.debug("nothing to discard at %s: %s", output_uri, exc)


# ------------------------------------------------------------------ the loop
def check_cron(expression: str) -> None:
    from croniter import croniter

    if not croniter.is_valid(expression):
        raise ScheduleError(f"--cron {expression!r} is not a cron expression (five fields: minute hour day "
                            "month weekday, e.g. '*/15 * * * *')")


def next_fire(expression: str, after: datetime) -> datetime:
    from croniter import croniter

    return croniter(expression, after).get_next(datetime)


def run_schedule(expression: str, tick: Callable[[], TickResult], *, max_ticks: Optional[int] = None,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 sleep: Callable[[float], None] = time.sleep) -> list[TickResult]:
    """Run `tick` at each time `expression` names (UTC), one tick at a time, until `max_ticks` ran.

    Times missed while a tick ran are skipped, not caught up. A tick that raises (storage down) is logged
    and the schedule goes on: the next tick retries whatever was not done.
    """
    check_cron(expression)
    results: list[TickResult] = []
    while max_ticks is None or len(results) < max_ticks:
        fire = next_fire(expression, now())
        wait_s = (fire - now()).total_seconds()
        logger.info("next tick at %s (in %.0fs)", fire.isoformat(timespec="seconds"), max(wait_s, 0))
        if wait_s > 0:
            sleep(wait_s)
        try:
            results.append(tick())
        except Exception as exc:
            logger.exception("tick failed before captioning; retrying at the next time: %s", exc)
            results.append(TickResult("failed", error=f"{type(exc).__name__}: {exc}"))
    return results
