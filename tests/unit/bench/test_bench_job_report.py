"""The job-level results renderer (bench/job_report.py): rows per target and ours / plain per workload."""
from __future__ import annotations

from bench.job_report import markdown, ratio


def run(target: str, wall: float, start: float, rows: int = 10_000, steady: dict | None = None) -> dict:
    return {"target": target, "workload": target.split("-")[1].upper(), "rows": rows, "errors": 0,
            "wall_s": wall, "engine_start_s": start, "images_per_s": round(rows / wall, 3),
            "images_per_s_after_start": round(rows / (wall - start), 3), "usd_per_1m_images": 12.5,
            "steady": steady}


STEADY = {"rows_per_s": 30.0, "open_s": 210.0, "close_s": 400.5, "prepared_before_window": False,
          "at_open": {"prepared": 900, "generated": 64, "ahead": 836},
          "at_close": {"prepared": 9990, "generated": 6200, "ahead": 3790}}


def test_rows_and_ratios_of_one_results_file():
    results = {"meta": {"card": "NVIDIA H200", "vllm": "0.26.0", "ray": "2.60.0", "gpu_hourly_usd": 3.5,
                        "dataset": [{"workload": "W1", "rows": 10000, "bytes": 950_000_000, "write_s": 31.2}]},
               "runs": [run("ours-w1", 600.0, 200.0, steady=STEADY), run("plain-w1", 800.0, 100.0),
                        run("ours-w2", 300.0, 150.0, rows=2000), {"target": "plain-w2", "failed": "no output written"}]}
    text = markdown(results)
    lines = text.splitlines()
    assert lines[0].startswith("Card: NVIDIA H200, vLLM 0.26.0") and "W1 10,000 rows (0.95 GB, written in 31.2 s)" in lines[0]
    ours = next(line for line in lines if line.startswith("| ours-w1 |"))
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells == ["ours-w1", "10,000", "0", "600.0", "200.0", "16.67", "25.00", "12.50", "30.00",
                     "210.0-400.5 s", "836 (900 - 64)", "3,790 (9,990 - 6,200)", "no"]
    assert any(line.startswith("| plain-w2 | failed: no output written") for line in lines)
    # W1 only: W2 has no plain result to divide by. ours 16.67 / plain 12.5 = 1.33x; less start 25 / 14.286.
    ratios = [line for line in lines if line.startswith("| W")]
    assert ratios == ["| W1 | 1.33x | 1.75x | 2.10x |"]
    # No steady rate (a flagged run too short to rate): a dash, not "-x".
    results["runs"][0]["steady"] = {**STEADY, "rows_per_s": None}
    assert "| W1 | 1.33x | 1.75x | - |" in markdown(results).splitlines()


def test_ratio_of_missing_values_is_none():
    assert ratio(None, 2.0) is None and ratio(2.0, None) is None and ratio(3.0, 2.0) == 1.5
