"""Our batch pipeline on workload W1: the same Ray Data path `jobs.caption` runs, timed row by row.

    python -m bench.pipeline_run CHECKPOINT W1_PARQUET --label pipeline-fp8 [--set field=value ...]

The rate reported, `requests_per_s`, is the engine's whole run: all rows over the time from the first
row entering the engine stage to the last row out. Each output row carries its time in that stage
(`engine_latency_s`), so the time it entered is its arrival here minus that latency. Engine start-up is
a fixed cost per job, reported separately (`first_output_after_s`).

Why not a steady-state window: W1's fixed-length outputs make the engine work in waves of
`max_num_seqs` requests that finish together (docs/performance.md, "How the rate is measured"). Rows out
between 10% and 90% of the run, over the time between, the rate this benchmark reported until
2026-11-27, then counts more than one wave's rows per wave's time: up to 2x too high with two waves.
It is kept as `requests_per_s_10_90`, to compare with the results files of that time. The whole run is
exact for whole waves, and errs low otherwise: it includes the first requests' ramp and the engine's
one-time kernel compilation, both of which a longer run amortises (`--pipeline-n`).
The JPEG bytes are decoded, resized and handed to the engine by the pipeline itself.
"""
from __future__ import annotations

import argparse
import os
import time

from bench.common import GpuSampler, bench_overrides, card_name, emit

def steady_rate(arrivals: list[tuple[float, int]], total: int, low: float = 0.1, high: float = 0.9) -> float:
    """Rows per second between the arrival of the `low` and `high` fractions of all rows (biased by waves:
    see the module's docstring; kept for comparison with older results)."""
    done, start_t, start_rows = 0, None, 0
    for t, rows in arrivals:
        done += rows
        if start_t is None and done >= low * total:
            start_t, start_rows = t, done
        if done >= high * total and start_t is not None and t > start_t:
            return (done - start_rows) / (t - start_t)
    return float("nan")


def whole_run_rate(arrivals: list[tuple[float, list[float]]]) -> dict[str, float]:
    """Rows per second from the first row entering the engine stage to the last row out, from
    (arrival time, the batch's engine latencies) pairs."""
    entered = min(t - latency for t, latencies in arrivals for latency in latencies)
    last_out = max(t for t, _ in arrivals)
    rows = sum(len(latencies) for _, latencies in arrivals)
    return {"requests_per_s": round(rows / (last_out - entered), 2),
            "first_row_out_after_entering_s": round(arrivals[0][0] - entered, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("w1_parquet")
    parser.add_argument("--label", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq
    import vllm

    from pipeline.io import records as R
    from pipeline.batch.caption import build_caption_dataset, plan_input, plan_model
    from pipeline.config import PipelineConfig
    from pipeline.ops.runtime import init_ray
    from pipeline.engine.patches import range_cache_enabled

    overrides = bench_overrides(args.checkpoint, args.overrides)
    config = PipelineConfig.load(overrides=overrides).with_absolute_paths()
    total = pq.ParquetFile(args.w1_parquet).metadata.num_rows
    started = time.perf_counter()
    model = plan_model(config)
    init_ray(config)
    plan = plan_input(config, args.w1_parquet)
    dataset, _ = build_caption_dataset(config, plan, model)
    sampler = GpuSampler()
    arrivals, errors, generated, first = [], 0, 0, None
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        now = time.perf_counter()
        if first is None:
            first = now
            sampler.start()  # from the first output on: engine start-up is not the workload
        # A failed request has no latency (-1 from Ray, null here): it counts as entering when it left.
        latencies = [max(v or 0.0, 0.0) for v in batch.column(R.ENGINE_LATENCY_S).to_pylist()]
        arrivals.append((now, latencies))
        errors += batch.num_rows - batch.column("error").null_count
        generated += sum(v or 0 for v in batch.column("completion_tokens").to_pylist())
    wall = time.perf_counter() - started
    rows = sum(len(latencies) for _, latencies in arrivals)
    rates = whole_run_rate(arrivals)
    emit({"label": args.label, "checkpoint": args.checkpoint, "engine": "pipeline (Ray Data + ray.data.llm)",
          "card": card_name(), "vllm": vllm.__version__, "workload": "W1", "n": rows, "errors": errors,
          **rates, "requests_per_s_10_90": round(steady_rate([(t, len(l)) for t, l in arrivals], rows), 2),
          "generated_tokens_per_s": round(rates["requests_per_s"] * generated / max(rows, 1), 1),
          "wall_s_including_startup": round(wall, 1), "first_output_after_s": round(first - started, 1),
          # Each batch out: seconds since the first row entered, rows, and its rows' engine latencies
          # (min, max): enough to rate the run again another way later.
          "batches": [[round(t - first + rates["first_row_out_after_entering_s"], 2), len(lat),
                       round(min(lat), 2), round(max(lat), 2)] for t, lat in arrivals if lat],
          "settings": overrides, "range_cache": range_cache_enabled({**os.environ, **config.runtime.env_vars}),
          **sampler.stop()})
    if rows != total:
        raise SystemExit(f"pipeline returned {rows} rows for {total} inputs")


if __name__ == "__main__":
    main()
