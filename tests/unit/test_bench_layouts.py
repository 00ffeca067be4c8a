"""The layout benchmark: its table in docs/performance.md is computed from the results file (ratios
included), a failed TP run is followed by its fallback in the same lease, and the online servers get the
batch job's engine arguments through vLLM's own command line."""
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
        {"label": "online-fp8-2x1", "layout": "2x1", "workload": "W1-online", "streams": 8, "requests_per_s": 7.5,
         "engine": "vLLM OpenAI server, layout 2x1 (of 4x1 started)", "latency_p50_s": 0.9, "errors": 0},
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
    # A subset of the started servers says so.
    assert "| 2 x TP=1 replicas (of the started servers) | 8 | 7.50 | 900 ms |" in text
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

    run_in_order(["pipeline-fp8-tp4", "pipeline-fp8-4x1", "online-fp8-tp4", "online-fp8-tp2"], run,
                 lambda name, results: recorded.append(name))
    # The fallback runs at once; the queued TP=4 online run goes straight to its fallback, other layouts
    # (4x1, tp2) keep theirs.
    assert ran == recorded == ["pipeline-fp8-tp4", "pipeline-fp8-tp4-nccl", "pipeline-fp8-4x1",
                               "online-fp8-tp4-nccl", "online-fp8-tp2"]


def test_a_run_that_succeeds_keeps_the_later_runs_as_named():
    from bench.gpu_throughput import run_in_order

    ran = []
    run_in_order(["online-fp8-tp4", "pipeline-fp8-tp4"], lambda name: ran.append(name) or [{"label": name}],
                 lambda name, results: None)
    assert ran == ["online-fp8-tp4", "pipeline-fp8-tp4"]


def test_online_servers_get_the_batch_engine_arguments_through_vllms_parser():
    """The flags parse back, with vLLM's own engine argument parser, into the values our config gives
    the batch engine: TP from the layout, booleans both ways, dicts as JSON, the TP-run overrides."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from bench.common import bench_overrides
    from bench.gpu_throughput import NO_FUSION_NCCL
    from bench.online_latency import server_engine_kwargs, vllm_cli_args
    from pipeline.config import PipelineConfig
    from pipeline.engine import engine_kwargs

    overrides = [f"engine.extra_engine_kwargs={NO_FUSION_NCCL}", "engine.enable_prefix_caching=false"]
    kwargs = server_engine_kwargs(overrides, "/models/gemma3-12b-fp8", tp=4)
    batch = engine_kwargs(PipelineConfig.load(overrides=bench_overrides(
        "/models/gemma3-12b-fp8", overrides + ["engine.tensor_parallel_size=4"])).with_absolute_paths())
    assert kwargs == batch

    flags = vllm_cli_args(kwargs)
    assert "--no-enable-prefix-caching" in flags and "--disable-custom-all-reduce" in flags
    parsed = AsyncEngineArgs.from_cli_args(
        AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "/models/x", *flags]))
    assert parsed.tensor_parallel_size == 4
    assert parsed.enable_prefix_caching is False and parsed.enforce_eager is False
    assert parsed.disable_custom_all_reduce is True
    assert parsed.max_model_len == kwargs["max_model_len"] and parsed.max_num_seqs == kwargs["max_num_seqs"]
    assert parsed.gpu_memory_utilization == kwargs["gpu_memory_utilization"]
    assert parsed.limit_mm_per_prompt == {"image": 1}
    assert parsed.hf_overrides == {"architectures": ["Gemma3FastImagesForConditionalGeneration"]}
    assert parsed.structured_outputs_config.backend == "xgrammar"
    assert parsed.structured_outputs_config.disable_any_whitespace is True
    fusion = parsed.compilation_config
    fusion = fusion.pass_config if hasattr(fusion, "pass_config") else fusion["pass_config"]
    fusion = fusion.fuse_allreduce_rms if hasattr(fusion, "fuse_allreduce_rms") else fusion["fuse_allreduce_rms"]
    assert fusion is False


def test_every_named_run_builds_a_command_whose_overrides_the_config_accepts():
    """A typo in a run's `--set` (or an override the config rejects) would otherwise surface only on a
    lent GPU, minutes into a lease: every named run is expanded and its overrides loaded here."""
    from argparse import Namespace
    from pathlib import Path

    from bench.common import bench_overrides
    from bench.gpu_throughput import RUNS, run_command
    from pipeline.config import PipelineConfig

    args = Namespace(workdir="/tmp/bench", plain_n=8, text_n=8, device="cuda")
    checkpoints = {"fp8": Path("/tmp/bench/fp8"), "bf16": Path("/tmp/bench/bf16")}
    data = {"plain": Path("/tmp/bench/plain.parquet"), "pipeline": Path("/tmp/bench/w1.parquet")}
    for name, (kind, _, _) in RUNS.items():
        command = run_command(name, checkpoints, data, args)
        assert command[1] == f"bench.{'plain_vllm' if kind == 'plain' else 'online_latency' if kind == 'online' else 'pipeline_run'}"
        assert not any("{workdir}" in item for item in command), name
        overrides = [command[i + 1] for i, item in enumerate(command) if item == "--set"]
        if kind != "plain":
            PipelineConfig.load(overrides=bench_overrides("/tmp/bench/fp8", overrides), environ={})
    assert "--profile-dir" in run_command("plain-fp8", checkpoints, data, args)
    assert "/tmp/bench/profile-plain-fp8" in run_command("plain-fp8", checkpoints, data, args)
