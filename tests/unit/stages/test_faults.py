"""Crash isolation in the engine stage (pipeline.stages.crash_isolation), without an engine: the ledger, the gate, and the
batch loop over a fake engine that 'crashes' on one record, replayed as Ray replays a task after a restart."""
import asyncio
from typing import Any

import pytest

from pipeline.io import records as R
from pipeline.stages.crash_isolation import CrashIsolatingEngine, EngineGate, RowLedger
from tests.fault_injection.fake_poison import contains

IDX = "__idx_in_batch"


def test_ledger_counts_unfinished_attempts_only():
    ledger = RowLedger()
    ledger.begin(1)
    ledger.begin(2)
    ledger.finish(1)
    assert ledger.crashes([1, 2, 3]) == [0, 1, 0]
    ledger.begin(2)  # retried after the crash that left it unfinished
    ledger.isolate(7)
    ledger.engine_started(pid=1)
    assert ledger.crashes([2]) == [2]
    assert ledger.summary() == {"engine_requests": 3, "engine_starts": 1, "rows_retried_after_crash": 1,
                                "poison_rows": 1}
    assert ledger.unfinished == {2: 2}, "finished rows are forgotten: memory follows what is in flight"


def test_gate_exclusive_waits_for_shared_and_holds_new_shared_back():
    async def scenario() -> list[str]:
        gate, events = EngineGate(), []

        async def shared(name: str, hold_s: float) -> None:
            async with gate.shared():
                events.append(f"{name}+")
                await asyncio.sleep(hold_s)
                events.append(f"{name}-")

        async def exclusive() -> None:
            async with gate.exclusive():
                events.append("X+")
                await asyncio.sleep(0.01)
                events.append("X-")

        first = asyncio.create_task(shared("a", 0.05))
        await asyncio.sleep(0.01)
        alone = asyncio.create_task(exclusive())
        await asyncio.sleep(0.01)
        late = asyncio.create_task(shared("b", 0.01))  # arrives while X waits: must not overtake it
        await asyncio.gather(first, alone, late)
        return events

    assert asyncio.run(scenario()) == ["a+", "a-", "X+", "X-", "b+", "b-"]


class _Done:
    """An already-computed result that `await` accepts, as a Ray ObjectRef of a finished call is."""

    def __init__(self, value: Any):
        self.value = value

    def __await__(self):
        if False:
            yield
        return self.value


class FakeLedgerHandle:
    """Stands in for the ledger's actor handle (no Ray here): `handle.method.remote(...)` runs the method."""

    def __init__(self, ledger: RowLedger):
        self.ledger = ledger

    def __getattr__(self, name: str):
        method = getattr(self.ledger, name)
        return type("Method", (), {"remote": staticmethod(lambda *args: _Done(method(*args)))})


class FakeEngineCrash(BaseException):
    """The engine process dying: nothing in the replica handles it (Ray's UDF would os._exit)."""


class FakeEngineUDF:
    """Stands in for Ray's vLLMEngineStageUDF (which needs a real engine; the integration tests run that):
    generates after a short wait, 'crashes' on the poison key, and records what ran alongside what."""

    IDX_IN_BATCH_COLUMN = IDX

    def __init__(self, poison: int, log: list):
        self.poison, self.log, self.in_flight = poison, log, 0

    async def _generate_with_error_handling(self, row: dict[str, Any], batch_uuid) -> dict[str, Any]:
        key = row[R.ROW_HASH]
        self.in_flight += 1
        self.log.append((key, self.in_flight))
        try:
            await asyncio.sleep(0.001 if key == self.poison else 0.01)
            if key == self.poison:
                raise FakeEngineCrash(key)
            return {IDX: row[IDX], "generated_text": f"text {key}"}
        finally:
            self.in_flight -= 1


class FakeGuardedEngine(CrashIsolatingEngine, FakeEngineUDF):
    def __init__(self, ledger: RowLedger, poison: int, log: list, max_engine_attempts: int):
        self._ledger_object = ledger
        super().__init__(poison, log, ledger_name="unused", max_engine_attempts=max_engine_attempts)

    def connect_ledger(self, name: str):
        return FakeLedgerHandle(self._ledger_object)


def _run_batch(engine: FakeGuardedEngine, batch: list[dict]) -> list[dict]:
    async def collect() -> list[dict]:
        return [output async for output in engine.udf([dict(row) for row in batch])]

    return asyncio.run(collect())


def test_poison_record_is_pinned_and_isolated_while_batch_mates_finish():
    ledger, poison = RowLedger(), 30
    batch = [{IDX: i, R.ROW_HASH: key, R.ID: f"id-{key}"} for i, key in enumerate([10, 20, 30, 40])]
    logs = []
    # Attempt 1: all four in flight together; the poison kills the engine; nobody finished.
    logs.append([])
    with pytest.raises(FakeEngineCrash):
        _run_batch(FakeGuardedEngine(ledger, poison, logs[-1], max_engine_attempts=2), batch)
    assert ledger.crashes([10, 20, 30, 40]) == [1, 1, 1, 1]
    # Attempt 2 (Ray restarted the replica and replays the task): each suspect runs alone, in batch order;
    # 10 and 20 finish, 30 crashes again, 40 never started.
    logs.append([])
    with pytest.raises(FakeEngineCrash):
        _run_batch(FakeGuardedEngine(ledger, poison, logs[-1], max_engine_attempts=2), batch)
    assert logs[-1] == [(10, 1), (20, 1), (30, 1)], "suspects run one at a time"
    assert ledger.crashes([10, 20, 30, 40]) == [0, 0, 2, 1]
    # Attempt 3: 30 is isolated without reaching the engine; the others are generated.
    logs.append([])
    outputs = _run_batch(FakeGuardedEngine(ledger, poison, logs[-1], max_engine_attempts=2), batch)
    assert sorted(o[IDX] for o in outputs) == [0, 1, 2, 3], "one output per row"
    (isolated,) = [o for o in outputs if o.get("__inference_error__")]
    assert isolated[IDX] == 2 and isolated[R.ROW_ERROR_KIND] == "poison_record"
    assert isolated[R.ROW_ERROR_STAGE] == "engine"
    assert isolated[R.ROW_ERROR].startswith("poison_record: the engine crashed on each of this record's last 2")
    assert 30 not in [key for key, _ in logs[-1]]
    assert ledger.summary() == {"engine_requests": 4 + 3 + 3, "engine_starts": 3, "rows_retried_after_crash": 4,
                                "poison_rows": 1}


def test_rows_without_crashes_run_concurrently():
    ledger, log = RowLedger(), []
    batch = [{IDX: i, R.ROW_HASH: key} for i, key in enumerate([1, 2, 3])]
    outputs = _run_batch(FakeGuardedEngine(ledger, poison=-1, log=log, max_engine_attempts=3), batch)
    assert sorted(o["generated_text"] for o in outputs) == ["text 1", "text 2", "text 3"]
    assert max(depth for _, depth in log) == 3
    assert ledger.summary()["engine_requests"] == 3 and ledger.unfinished == {}


@pytest.mark.parametrize("sequence, marker, expected", [
    pytest.param([2, 105, 4, 9], [4], True, id="single"),
    pytest.param([2, 105, 4, 9], [105, 4], True, id="pair"),
    pytest.param([2, 105, 9, 4], [105, 4], False, id="split"),
    pytest.param([2, 105], [], False, id="empty-marker"),
])
def test_fake_poison_marker_match(sequence, marker, expected):
    assert contains(sequence, marker) is expected
