"""Engine crashes in the batch job: retry what was in flight, pin a repeated crash on its record, count it.

Ray Data runs the engine stage in actors with `max_restarts=-1, max_task_retries=-1`, and Ray's engine UDF
calls `os._exit(1)` when vLLM reports its engine dead, so a crashed engine comes back and the task that
held the batch runs again: rows are never lost. What Ray does not do is stop: a record that kills the
engine every time (a kernel fault on one input) makes that task fail and retry forever, and its
batch-mates with it. This module adds the missing part, in the engine stage only:

- A `RowLedger` actor (one per job, outside the engine actors, so it survives their crashes) counts,
  per row key (R.ROW_HASH), the engine attempts that began and never finished: an attempt that never
  finished was in flight when its engine died.
- `CrashIsolatingEngine` (a mixin over Ray's engine UDF, or our tool-chain UDF) asks the ledger before
  generating. A row with no unfinished attempt is generated as usual, concurrently. A row with some is
  a suspect and is generated alone in its replica (an exclusive gate waits for everything else in
  flight to finish), so that if the engine dies now, the crash is pinned on that row, not on the
  batch-mates that happened to share the engine with it. A row whose attempts ended in a crash
  `batch.max_engine_attempts` times is written as a `poison_record` error row without touching the engine.

Cost: after a crash, the rows that were in flight run one at a time in that replica until each has
finished once (seconds per row on a GPU); an unrelated crash (a preempted node) while a suspect runs
alone counts against it, so a row is isolated only after that many crashes while it was alone.

The ledger also counts engine requests (rows sent to an engine, per attempt) and engine (re)starts,
which the run's attempt record reports (pipeline.batch.resume).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from pipeline.io import records as R
from pipeline.engine.start import explain_start_failure
from pipeline.engine.shm_tracker import start_detached_tracker

logger = logging.getLogger(__name__)

LEDGER_NAMESPACE = "gemma3-pipeline"


class RowLedger:
    """Ray actor (see `start_row_ledger`): per-row unfinished engine attempts, and the job's engine counts.

    Only rows with an unfinished attempt are kept, so memory follows what is in flight and the suspects,
    not the size of the dataset.
    """

    def __init__(self) -> None:
        self.unfinished: dict[int, int] = {}
        self.poisoned: set[int] = set()
        self.requests = 0
        self.retried = 0
        self.engine_starts = 0

    def crashes(self, keys: list[int]) -> list[int]:
        return [self.unfinished.get(key, 0) for key in keys]

    def begin(self, key: int) -> None:
        previous = self.unfinished.get(key, 0)
        self.retried += previous > 0
        self.unfinished[key] = previous + 1
        self.requests += 1

    def finish(self, key: int) -> None:
        self.unfinished.pop(key, None)

    def isolate(self, key: int) -> None:
        self.poisoned.add(key)

    def engine_started(self, pid: int) -> None:
        self.engine_starts += 1
        logger.info("engine replica started in pid %d (start #%d of this job)", pid, self.engine_starts)

    def summary(self) -> dict[str, int]:
        return {"engine_requests": self.requests, "engine_starts": self.engine_starts,
                "rows_retried_after_crash": self.retried, "poison_rows": len(self.poisoned)}


def start_row_ledger(job_name: str):
    """Start this job's ledger actor (0 CPUs, on the driver's node); returns (handle, actor name)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"row-ledger-{job_name}-{uuid.uuid4().hex[:8]}"
    # On the driver's node: if that node dies, the driver (and with it the job) dies too, so the ledger
    # never outlives its usefulness nor dies while the job goes on.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = ray.remote(num_cpus=0, max_restarts=-1)(RowLedger).options(
        name=name, namespace=LEDGER_NAMESPACE, scheduling_strategy=here).remote()
    return handle, name


def stop_row_ledger(handle) -> dict[str, int]:
    """The ledger's counts (empty if it went down with the cluster), then the ledger is stopped."""
    import ray

    try:
        summary = ray.get(handle.summary.remote(), timeout=60)
    except Exception:
        logger.warning("the row ledger is gone; this attempt's engine counts are unknown", exc_info=True)
        summary = {}
    try:
        ray.kill(handle)
    except Exception:
        logger.debug("row ledger already stopped", exc_info=True)
    return summary


class EngineGate:
    """Shared or exclusive use of one engine replica, from the replica's event loop.

    Exclusive waits for every shared user to finish and holds new ones back while it waits (so a suspect
    is not starved by a stream of fresh rows).
    """

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._condition:
            await self._condition.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._condition:
            self._waiting += 1
            try:
                await self._condition.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._condition:
                self._exclusive = False
                self._condition.notify_all()


_ENGINE_SHUTTING_DOWN = threading.Event()


class _ExpectedEngineDeath(logging.Filter):
    """Drops vLLM's "AsyncLLM output_handler failed" (an EngineDeadError with its traceback) once our
    engine is shutting down: AsyncLLM.shutdown stops the engine core before it cancels that handler, so
    a clean end of a job logged the engine's death as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        dead = record.exc_info and type(record.exc_info[1]).__name__ == "EngineDeadError"
        return not (dead and _ENGINE_SHUTTING_DOWN.is_set())


def quiet_engine_shutdown() -> None:
    """In an engine actor, before vLLM starts: the filter above on vLLM's AsyncLLM logger."""
    async_llm_logger = logging.getLogger("vllm.v1.engine.async_llm")
    if not any(isinstance(f, _ExpectedEngineDeath) for f in async_llm_logger.filters):
        async_llm_logger.addFilter(_ExpectedEngineDeath())


class CrashIsolatingEngine:
    """Mixin for a vLLM engine stage UDF (Ray's, or pipeline.stages.tools.ToolChainEngineUDF).

    It replaces the parent's batch loop (`udf`) and keeps its per-row generation
    (`_generate_with_error_handling`: error rows, the fatal-error exit, the tool chain).
    """

    def __init__(self, *args: Any, ledger_name: str, max_engine_attempts: int, **kwargs: Any):
        quiet_engine_shutdown()
        # Before vLLM spawns its processes: their shared memory is tracked where Ray's exit does not
        # kill the tracker (pipeline.engine.shm_tracker).
        start_detached_tracker()
        with explain_start_failure():  # a failed start says why in one line (pipeline.engine.start)
            super().__init__(*args, **kwargs)
        self.ledger = self.connect_ledger(ledger_name)
        self.max_engine_attempts = max_engine_attempts
        self.gate = EngineGate()
        # Not awaited: calls from one caller reach an actor in order, so this lands before any row's.
        self.ledger.engine_started.remote(os.getpid())

    def __del__(self) -> None:
        # Ray Data drops the actor when the dataset is done; the parent's __del__ shuts the engine down.
        _ENGINE_SHUTTING_DOWN.set()
        super().__del__()

    def connect_ledger(self, name: str):
        import ray

        return ray.get_actor(name, namespace=LEDGER_NAMESPACE)

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        started = time.perf_counter()
        batch_uuid = uuid.uuid4()
        keys = [int(row[R.ROW_HASH]) for row in batch]
        crashes = await self.ledger.crashes.remote(keys)
        fresh, suspects, isolated = [], [], 0
        for row, key, count in zip(batch, keys, crashes):
            if count >= self.max_engine_attempts:
                isolated += 1
                await self.ledger.isolate.remote(key)
                yield self.poison_row(row, count, batch_uuid)
            elif count:
                suspects.append((count, key, row))
            else:
                fresh.append((key, row))
        tasks = [asyncio.create_task(self._attempt(row, key, batch_uuid, alone=False)) for key, row in fresh]
        for task in asyncio.as_completed(tasks):
            yield await task
        # Fewest crashes first: the innocent batch-mates of a poison record clear themselves before it
        # crashes the engine again.
        for _, key, row in sorted(suspects, key=lambda suspect: suspect[0]):
            yield await self._attempt(row, key, batch_uuid, alone=True)
        logger.info("engine batch %s: %d rows (%d retried alone after a crash, %d isolated as poison) in %.2fs",
                    batch_uuid.hex[:8], len(batch), len(suspects), isolated, time.perf_counter() - started)

    async def _attempt(self, row: dict[str, Any], key: int, batch_uuid: uuid.UUID, alone: bool) -> dict[str, Any]:
        async with (self.gate.exclusive() if alone else self.gate.shared()):
            await self.ledger.begin.remote(key)
            # If the engine dies in here, the parent's handler exits this process and `finish` never
            # runs: the unfinished attempt is what the ledger remembers.
            output = await self._generate_with_error_handling(row, batch_uuid)
            await self.ledger.finish.remote(key)
        return output

    def poison_row(self, row: dict[str, Any], crashes: int, batch_uuid: uuid.UUID) -> dict[str, Any]:
        from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMOutputData

        error = R.RecordError(
            R.ErrorKind.POISON_RECORD,
            f"the engine crashed on each of this record's last {crashes} attempts "
            f"(batch.max_engine_attempts={self.max_engine_attempts}); it was not retried again",
            R.Stage.ENGINE).as_columns()
        logger.error("row %s (id %r) isolated as a poison record after %d engine crashes", row.get(R.ROW_HASH),
                     row.get(R.ID), crashes)
        # The same fields as Ray's own error rows, so the batch keeps one shape; `__inference_error__`
        # makes every later stage pass the row through to the output builder.
        return {**vLLMOutputData(prompt="", prompt_token_ids=None, num_input_tokens=0).model_dump(),
                "request_id": -1, self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN],
                "batch_uuid": batch_uuid.hex, "time_taken_llm": -1, "params": "",
                "__inference_error__": error[R.ROW_ERROR], **error}


@dataclass(frozen=True)
class EngineGuardSettings:
    """What the engine stage's crash isolation needs: its ledger's name and the attempts before isolation."""

    ledger_name: str
    max_engine_attempts: int
