"""The job-level benchmark's window, ahead and cost arithmetic (bench/job_window.py), on built inputs."""
from __future__ import annotations

import pytest

from bench.job_data import shard_ranges
from bench.job_run import bench_sets
from bench.job_window import (job_rates, output_instants, progress_snapshots, rate_between, steady_window,
                              usd_per_million)


def progress_block(t: float, prepared: int, generated: int, total: int = 1000) -> list[tuple[float, str]]:
    """One refresh of Ray Data's non-TTY progress log, as the job prints it."""
    head = "2026-12-03 07:41:25,315\tINFO logging_progress.py:231 -- "
    return [(t, f"{head}======= Running Dataset: dataset_1_0 ======="),
            (t, f"{head}Total Progress: {generated}/?"),
            (t, f"{head}ReadFilesParquetV2: {total}/{total}"),
            (t, f"{head}Project->MapBatches(PrepareRecords): {prepared}/{total}"),
            (t, "2026-12-03 07:41:25,315\tINFO logging_progress.py:233 --   Tasks: 0; Actors: 4 (running=4)"),
            (t, f"{head}MapBatches(ChatTemplateUDF): {prepared}/{total}"),
            (t + 0.01, f"{head}MapBatches(CrashIsolatingEngineUDF): {generated}/{total}"),
            (t + 0.01, f"{head}Map(_postprocess)->MapBatches(FinalizeRows)->MapBatches(TallyRows)->Write: {generated}/?")]


def test_snapshots_pair_the_prepare_line_with_the_engine_line_after_it():
    lines = [(0.5, "INFO pipeline.batch.progress: progress: 0/1000 rows (0.0%)")]
    lines += progress_block(2.0, 128, 0) + progress_block(4.0, 512, 64)
    lines += [(5.0, "(MapWorker(MapBatches(vLLMEngineStageUDF)) pid=1) MapBatches(vLLMEngineStageUDF): 7/9 x")]
    assert progress_snapshots(lines) == [(2.01, 128, 0), (4.01, 512, 64)]


def test_snapshots_read_the_stock_engine_stage_name_too():
    head = "x INFO logging_progress.py:231 -- "
    lines = [(1.0, head + "MapBatches(PrepareRecords): 10/?"), (1.0, head + "MapBatches(vLLMEngineStageUDF): 3/?")]
    assert progress_snapshots(lines) == [(1.0, 10, 3)]


def test_rate_between_counts_rows_after_the_first_instant_up_to_the_last():
    instants = output_instants([10.0] * 256 + [20.0] * 256 + [30.0] * 256 + [40.0] * 100)
    assert instants == [(10.0, 256), (20.0, 256), (30.0, 256), (40.0, 100)]
    rated = rate_between(instants, 5.0, 35.0)
    # Whole waves: 512 rows over the 20 s from the first wave's end to the third's, exact.
    assert (rated["rows"], rated["seconds"], rated["rows_per_s"]) == (512, 20.0, 25.6)
    assert rate_between(instants, 11.0, 19.0)["rows_per_s"] is None
    # One batch whose rows were stamped milliseconds apart: no rate, not thousands of rows/s.
    assert rate_between(output_instants([5.000] * 30 + [5.004] * 10), 0.0, 9.0)["rows_per_s"] is None


def waves(first_out: float, period: float, count: int, size: int) -> list[float]:
    return [first_out + i * period for i in range(count) for _ in range(size)]


def test_window_while_preparation_runs_records_how_far_it_ran_ahead():
    total = 1280
    finished = waves(100.0, 10.0, 5, 256)  # waves out at 100, 110, ..., 140
    snapshots = [(90.0, 600, 0), (101.0, 800, 256), (111.0, 1000, 512), (121.0, 1200, 768),
                 (125.0, 1279, 768), (131.0, 1280, 1024), (141.0, 1280, 1280)]
    window = steady_window(snapshots, finished, total, max_num_seqs=256, origin=50.0)
    assert window["prepared_before_window"] is False
    assert window["kind"] == "preparation and engine both running"
    # Open at the first row out (100), close at the last snapshot still preparing (125) -> instants 100..120.
    assert (window["open_s"], window["close_s"]) == (50.0, 75.0)
    assert (window["rated_from_s"], window["rated_to_s"], window["rows"], window["rows_per_s"]) == (50.0, 70.0, 512, 25.6)
    assert window["at_open"] == {"prepared": 600, "generated": 0, "ahead": 600}
    assert window["at_close"] == {"prepared": 1279, "generated": 768, "ahead": 511}
    assert (window["ahead_max"], window["ahead_min"]) == (544, 432)
    assert window["first_row_out_s"] == 50.0 and window["last_row_out_s"] == 90.0
    assert window["preparation_done_s"] == 81.0
    assert window["wave_bias"] == pytest.approx(256 / 20.0 / 25.6, abs=1e-3)


def test_at_open_is_the_last_snapshot_at_or_before_the_first_row_out():
    finished = waves(100.0, 10.0, 3, 10)
    snapshots = [(95.0, 25, 0), (99.0, 28, 0), (105.0, 30, 10)]
    window = steady_window(snapshots, finished, 40, max_num_seqs=10)
    assert window["at_open"] == {"prepared": 28, "generated": 0, "ahead": 28}


def test_preparation_done_before_the_first_row_is_flagged_and_rated_over_the_engine_run():
    finished = waves(200.0, 5.0, 4, 10)  # 200, 205, 210, 215
    snapshots = [(150.0, 20, 0), (180.0, 40, 0), (201.0, 40, 10), (216.0, 40, 40)]
    window = steady_window(snapshots, finished, 40, max_num_seqs=10, origin=100.0)
    assert window["prepared_before_window"] is True
    assert window["kind"].startswith("engine only")
    assert (window["open_s"], window["close_s"], window["rows"], window["rows_per_s"]) == (100.0, 115.0, 30, 2.0)
    assert window["ahead_max"] == 30 and window["ahead_min"] == 30  # the snapshot at 201 s
    assert window["at_open"] == {"prepared": 40, "generated": 0, "ahead": 40}
    assert window["preparation_done_s"] == 80.0


def test_no_progress_lines_at_all_is_flagged_not_invented():
    window = steady_window([], waves(10.0, 1.0, 3, 4), 12, max_num_seqs=4)
    assert window["prepared_before_window"] is True and window["at_open"] is None
    assert window["rows_per_s"] == 4.0


def test_no_rows_out():
    assert steady_window([(1.0, 5, 0)], [], 5, 4)["rows_per_s"] is None


def test_cost_and_job_rates():
    # $3.50 per GPU-hour at 25 images/s: 3.5 / 3600 / 25 * 1e6 = $38.89 per 1M images.
    assert usd_per_million(25.0, 3.5) == 38.89
    assert usd_per_million(25.0, 3.5, gpus=2) == 77.78
    assert usd_per_million(None, 3.5) is None and usd_per_million(25.0, None) is None
    rates = job_rates(10_000, 500.0, 100.0, 3.5)
    assert rates == {"images_per_s": 20.0, "images_per_s_after_start": 25.0, "usd_per_1m_images": 48.61,
                     "usd_per_1m_images_after_start": 38.89}
    assert job_rates(10, 5.0, None, None)["images_per_s_after_start"] is None


def test_shards_cover_every_row_once():
    assert shard_ranges(1050, 500) == [(0, 500), (500, 1000), (1000, 1050)]
    assert shard_ranges(0, 50) == []


def test_ours_overrides_are_only_the_benchmark_ones():
    sets = bench_sets(128, 3.5)
    assert "sampling.max_tokens=128" in sets and "sampling.ignore_eos=true" in sets
    assert "report.gpu_hourly_usd=3.5" in sets
    assert not any(s.startswith(("engine.", "batch.prepare")) for s in sets)
    assert not any(s.startswith("report.gpu_hourly_usd") for s in bench_sets(128, None))
