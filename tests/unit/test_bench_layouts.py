"""The layout benchmark: its table in docs/performance.md is computed from the results file (ratios
included), and a failed TP run is followed by its fallback in the same lease."""
from bench.render_layouts import BEGIN, END, layout_of, main, render

RESULTS = {
    "ceilings": {"card": "NVIDIA H100 80GB HBM3"},
    "runs": [
        {"label": "pipeline-fp8-tp4", "workload": "W1", "requests_per_s": 50.0, "vllm": "0.26.0",
         "first_output_after_s": 250.0, "gpu_util_series": [0, 0, 80, 90]},
        {"label": "pipeline-fp8-4x1", "workload": "W1", "requests_per_s": 120.0, "first_output_after_s": 240.0},
        {"label": "online-fp8-tp4", "layout": "tp4", "workload": "W1-online", "streams": 1, "requests_per_s": 0.9,
         "latency_p50_s": 1.1, "latency_p99_s": 1.3, "ttft_p50_s": 0.05, "ttft_p99_s": 0.08, "errors": 0},
        {"label": "online-fp8-1x1", "layout": "1x1", "workload": "W1-online", "streams": 1, "requests_per_s": 0.5,
         "latency_p50_s": 2.0, "latency_p99_s": 2.4, "ttft_p50_s": 0.09, "ttft_p99_s": 0.1, "errors": 0},
        {"label": "online-fp8-4x1", "failed": True, "exit": "timeout"},
    ],
}


def test_layout_names_come_from_labels_or_the_result():
    assert layout_of({"label": "pipeline-fp8-tp4"}) == "tp4"
    assert layout_of({"label": "pipeline-fp8-4x1"}) == "4x1"
    assert layout_of({"label": "online-fp8-4x1", "layout": "2x1"}) == "2x1"
    assert layout_of({"label": "pipeline-fp8"}) is None


def test_render_tables_ratio_and_unfinished_runs():
    text = render(RESULTS)
    assert text.startswith(BEGIN) and text.endswith(END)
    assert "| one engine, TP=4 | 4 | 50.0 | 12.5 |" in text
    assert "| 4 x TP=1 replicas | 4 | 120.0 | 30.0 |" in text
    assert "4 x TP=1 / TP=4: **2.40x** images/s" in text
    assert "| one engine, TP=4 | 1 | 0.90 | 1100 ms | 1300 ms | 50 ms | 80 ms | 0 |" in text
    # Online rows sort by GPUs: the one-GPU subset comes before the 4-GPU engine.
    assert text.index("| 1 x TP=1 replicas | 1 |") < text.index("| one engine, TP=4 | 1 |")
    assert "Failed in this run (the text below says why): online-fp8-4x1." in text


def test_main_rewrites_only_between_markers(tmp_path):
    import json

    results = tmp_path / "r.json"
    results.write_text(json.dumps(RESULTS))
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Perf\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    main([str(results), "--doc", str(doc)])
    text = doc.read_text()
    assert "old table" not in text and "before" in text and text.rstrip().endswith("after")
    assert "2.40x" in text


def test_a_failed_tp_run_is_followed_by_its_fallback_at_once():
    from bench.gpu_throughput import FALLBACKS, RUNS, run_in_order

    assert all(name in RUNS and fallback in RUNS for name, fallback in FALLBACKS.items())
    ran, recorded = [], []

    # Stands in for bench.gpu_throughput.run_one, which starts a 12B engine on a GPU (none here): the
    # order and the fallback are what is tested.
    def run(name):
        ran.append(name)
        return [{"label": name, "failed": True}] if name == "pipeline-fp8-tp4" else [{"label": name}]

    run_in_order(["pipeline-fp8-tp4", "pipeline-fp8-4x1", "online-fp8-tp4"], run,
                 lambda name, results: recorded.append(name))
    # online-fp8-tp4 succeeded, so its fallback does not run.
    assert ran == recorded == ["pipeline-fp8-tp4", "pipeline-fp8-tp4-nccl", "pipeline-fp8-4x1", "online-fp8-tp4"]
