"""The status line's arithmetic: tallies of output batches, rates over a window, ETA, errors by kind."""
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from pipeline.io import records as R
from pipeline.batch.progress import RunCounter, StatusLine, empty_tally, merge_tally, tally_batch

SCHEMA = R.output_schema(pa.schema([("id", pa.string())]))


def _rows(ok: int, errors: list[tuple[str, str]]) -> pa.Table:
    now = datetime.now(timezone.utc)
    rows = [{R.ID: f"ok-{i}", R.PROMPT_TOKENS: 280, R.COMPLETION_TOKENS: 10 + i, R.ENGINE_LATENCY_S: 0.5 * (i + 1),
             R.FINISHED_AT: now} for i in range(ok)]
    rows += [{R.ID: f"bad-{i}", R.ERROR: f"{k}: x", R.ERROR_KIND: k, R.ERROR_STAGE: s, R.FINISHED_AT: now}
             for i, (k, s) in enumerate(errors)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_tally_counts_rows_errors_tokens_and_latencies():
    errors = [("not_found", "fetch"), ("not_found", "fetch"), ("engine_error", "engine")]
    tally, latencies = tally_batch(_rows(3, errors))
    assert tally == {"rows": 6, "ok": 3, "errors": 3, "prompt_tokens": 840, "completion_tokens": 33,
                     "errors_by_kind_stage": {("not_found", "fetch"): 2, ("engine_error", "engine"): 1}}
    assert latencies == [0.5, 1.0, 1.5]


def test_tally_of_openai_batch_lines_uses_their_error_columns():
    """An OpenAI Batch run's rows (pipeline.stages.openai_batch.OUTPUT_SCHEMA) name kind and stage `code`
    and `stage`, and have no engine latency: the same tally, from those columns."""
    from pipeline.stages.openai_batch import OUTPUT_SCHEMA

    lines = pa.Table.from_pylist([
        {"line": "{}", "custom_id": "a", "failed": False, "prompt_tokens": 12, "completion_tokens": 4},
        {"line": "{}", "custom_id": "b", "failed": True, "code": "model_not_found", "stage": "validate"},
    ], schema=OUTPUT_SCHEMA)
    tally, latencies = tally_batch(lines, ("code", "stage"))
    assert tally == {"rows": 2, "ok": 1, "errors": 1, "prompt_tokens": 12, "completion_tokens": 4,
                     "errors_by_kind_stage": {("model_not_found", "validate"): 1}}
    assert latencies == []


def test_counter_merges_tallies():
    counter = RunCounter()
    for table in (_rows(2, [("not_found", "fetch")]), _rows(1, [("not_found", "fetch"), ("corrupt_image", "image")])):
        counter.add(tally_batch(table)[0])
    totals = counter.snapshot()
    assert (totals["rows"], totals["ok"], totals["errors"]) == (6, 3, 3)
    assert totals["errors_by_kind_stage"] == {("not_found", "fetch"): 2, ("corrupt_image", "image"): 1}
    assert merge_tally(empty_tally(), totals) == totals


def _totals(rows: int, tokens: int, errors: dict | None = None) -> dict:
    errors = errors or {}
    return {"rows": rows, "ok": rows - sum(errors.values()), "errors": sum(errors.values()),
            "errors_by_kind_stage": errors, "prompt_tokens": 0, "completion_tokens": tokens}


def test_status_waits_then_reports_rate_and_eta_from_when_rows_started():
    line = StatusLine(total_rows=1000, started_s=0.0)
    assert line.update(30.0, _totals(0, 0)) == ("progress: 0/1,000 rows (0.0%) | waiting for the first rows "
                                               "(engine start-up) | errors 0 | elapsed 30s | ETA unknown")
    # 100 rows in the 30 s since the last row-less sample: 3.3 rows/s; 900 left -> 4m30s.
    text = line.update(60.0, _totals(100, 2000, {("not_found", "fetch"): 4}))
    assert text == ("progress: 100/1,000 rows (10.0%) | 3.3 rows/s, 67 generated tokens/s (last 30s) | "
                    "errors 4: not_found 4 | elapsed 1m00s | ETA 4m30s")


def test_status_rate_uses_a_sliding_window():
    line = StatusLine(total_rows=10_000, started_s=0.0, window_s=60.0)
    line.update(0.0, _totals(0, 0))
    line.update(30.0, _totals(3000, 0))   # fast start
    line.update(90.0, _totals(3600, 0))
    text = line.update(150.0, _totals(4200, 0))  # 10 rows/s over the last minute
    assert "10.0 rows/s" in text and "(last 1m00s)" in text and "ETA 9m40s" in text


def test_final_line_gives_whole_run_rates_and_top_error_kinds():
    line = StatusLine(total_rows=100, started_s=0.0)
    errors = {("a", "validate"): 5, ("b", "image"): 4, ("c", "fetch"): 3, ("d", "fetch"): 2, ("e", "engine"): 1}
    text = line.update(50.0, _totals(100, 500, errors), final="done")
    assert text == ("done: 100/100 rows (100.0%) | 2.0 rows/s, 10 generated tokens/s (whole run) | "
                    "errors 15: a 5, b 4, c 3, d 2, 1 more kinds | elapsed 50s")


@pytest.mark.parametrize("seconds, shown", [
    pytest.param(5, "5s", id="seconds"), pytest.param(125, "2m05s", id="minutes"),
    pytest.param(3 * 3600 + 7 * 60, "3h07m", id="hours")])
def test_durations(seconds, shown):
    from pipeline.batch.progress import _duration

    assert _duration(seconds) == shown
