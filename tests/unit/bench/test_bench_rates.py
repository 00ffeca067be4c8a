"""How bench.pipeline_run turns row arrivals into a rate. W1's fixed-length outputs make the engine work
in waves: `max_num_seqs` requests enter together and finish together. Whole waves must give the wave
rate exactly; the 10%-90% window the benchmark used until 2026-11-27 did not."""
import pytest

from bench.pipeline_run import steady_rate, whole_run_rate

WAVE, SECONDS_PER_WAVE, BATCH = 512, 20.0, 64


def waves(n_rows: int, start: float = 100.0) -> list[tuple[float, list[float]]]:
    """Batches of 64 rows out, in the order they arrive: wave k's rows all enter at the end of wave k-1
    (the earliest rows at `start`, when the engine is ready) and come out at the end of wave k."""
    arrivals = []
    for first in range(0, n_rows, BATCH):
        wave = first // WAVE
        out = start + (wave + 1) * SECONDS_PER_WAVE + 0.01 * (first % WAVE) / BATCH  # a batch a few ms apart
        arrivals.append((out, [out - (start + wave * SECONDS_PER_WAVE)] * BATCH))
    return arrivals


@pytest.mark.parametrize("n_waves", [2, 3, 6])
def test_whole_waves_give_the_wave_rate(n_waves):
    arrivals = waves(n_waves * WAVE)
    rate = whole_run_rate(arrivals)
    assert rate["requests_per_s"] == pytest.approx(WAVE / SECONDS_PER_WAVE, rel=0.01)
    assert rate["first_row_out_after_entering_s"] == pytest.approx(SECONDS_PER_WAVE, abs=0.1)


def test_the_old_10_90_window_overstates_few_waves():
    """Why the rate changed: with two waves, the window spans one wave's time and counts 80% of all rows."""
    for n_waves, overstated in ((2, 1.55), (3, 1.15)):
        arrivals = waves(n_waves * WAVE)
        rows = n_waves * WAVE
        old = steady_rate([(t, len(latencies)) for t, latencies in arrivals], rows)
        assert old > overstated * WAVE / SECONDS_PER_WAVE


def test_a_failed_row_counts_as_entering_when_it_came_out():
    arrivals = waves(WAVE)
    arrivals[0] = (arrivals[0][0], [0.0] + arrivals[0][1][1:])  # its latency unknown: 0, never below 0
    assert whole_run_rate(arrivals)["requests_per_s"] == pytest.approx(WAVE / SECONDS_PER_WAVE, rel=0.01)
