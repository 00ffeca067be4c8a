"""The GPU benchmark's orchestration, checked without a GPU: the layout table in docs/performance.md is
computed from the results file (ratios included), a failed TP run is followed by its fallback in the same
lease, the online servers get the batch job's engine arguments through vLLM's own command line, knobs
compose into runs, and lanes run side by side on their own GPUs with queues that grow while they work."""
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
    from pipeline.engine.args import engine_kwargs

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
    from bench.gpu_throughput import KNOBS, RUNS, run_command
    from pipeline.config import PipelineConfig

    args = Namespace(workdir="/tmp/bench", plain_n=8, text_n=8, device="cuda")
    checkpoints = {"fp8": Path("/tmp/bench/fp8"), "bf16": Path("/tmp/bench/bf16")}
    data = {"plain": Path("/tmp/bench/plain.parquet"), "pipeline": Path("/tmp/bench/w1.parquet")}
    # Every named run, and every knob on the batch and (where it has an equivalent) the plain run.
    names = list(RUNS) + [f"pipeline-fp8+{knob}" for knob in KNOBS] + \
        [f"plain-fp8+{knob}" for knob, (_, plain) in KNOBS.items() if plain is not None]
    for name in names:
        kind = RUNS[name.split("+")[0]][0]
        command = run_command(name, checkpoints, data, args)
        assert command[1] == f"bench.{'plain_vllm' if kind == 'plain' else 'online_latency' if kind == 'online' else 'pipeline_run'}"
        assert not any("{workdir}" in item for item in command), name
        overrides = [command[i + 1] for i, item in enumerate(command) if item == "--set"]
        if kind != "plain":
            PipelineConfig.load(overrides=bench_overrides("/tmp/bench/fp8", overrides), environ={})
    assert "--profile-dir" in run_command("plain-fp8", checkpoints, data, args)
    assert "/tmp/bench/profile-plain-fp8" in run_command("plain-fp8", checkpoints, data, args)


def _args():
    from argparse import Namespace

    return Namespace(workdir="/tmp/bench", plain_n=8, text_n=8, device="cuda")


def _paths():
    from pathlib import Path

    return ({"fp8": Path("/tmp/bench/fp8"), "bf16": Path("/tmp/bench/bf16")},
            {"plain": Path("/tmp/bench/plain.parquet"), "pipeline": Path("/tmp/bench/w1.parquet")})


def test_knobs_compose_into_one_engine_configuration():
    """Knobs set nested engine arguments side by side (compilation flags and the KV dtype), not one
    replacing the other; plain vLLM gets the same engine arguments."""
    import json

    from bench.common import bench_overrides
    from bench.gpu_throughput import run_command
    from pipeline.config import PipelineConfig
    from pipeline.engine.args import engine_kwargs

    checkpoints, data = _paths()
    command = run_command("pipeline-fp8+kv-fp8+encoder-graphs+seqs512", checkpoints, data, _args())
    overrides = [command[i + 1] for i, item in enumerate(command) if item == "--set"]
    config = PipelineConfig.load(overrides=bench_overrides("/tmp/bench/fp8", overrides), environ={})
    kwargs = engine_kwargs(config.with_absolute_paths())
    assert kwargs["kv_cache_dtype"] == "fp8" and kwargs["max_num_seqs"] == 512
    assert kwargs["compilation_config"]["compile_mm_encoder"] is True
    assert kwargs["compilation_config"]["cudagraph_mm_encoder"] is True
    assert config.batch.max_concurrent_batches == 12

    plain = run_command("plain-fp8+kv-fp8+seqs512", checkpoints, data, _args())
    engine_args = dict(plain[i + 1].split("=", 1) for i, item in enumerate(plain) if item == "--engine-arg")
    assert {k: json.loads(v) for k, v in engine_args.items()} == {"kv_cache_dtype": "fp8", "max_num_seqs": 512}


def test_unknown_or_inapplicable_knobs_fail_before_any_engine_starts():
    import pytest

    from bench.gpu_throughput import parse_lanes

    assert parse_lanes("pipeline-fp8,plain-fp8|pipeline-fp8+kv-fp8") == [["pipeline-fp8", "plain-fp8"],
                                                                         ["pipeline-fp8+kv-fp8"]]
    with pytest.raises(ValueError, match="unknown knob 'kv-fp9'"):
        parse_lanes("pipeline-fp8|pipeline-fp8+kv-fp9")
    with pytest.raises(ValueError, match="no plain vLLM equivalent"):
        parse_lanes("plain-fp8+2per-gpu")
    with pytest.raises(ValueError, match="unknown run 'pipeline-fp4'"):
        parse_lanes("pipeline-fp4")


def test_lanes_run_side_by_side_each_on_its_own_gpu(tmp_path):
    """Lane 0's first run waits for lane 1's to have started: sequential lanes would time out here."""
    import threading

    from bench.gpu_throughput import run_lanes

    lane1_started, seen, recorded = threading.Event(), [], []

    # Stands in for run_one (a 12B engine on a GPU; none here): which run gets which environment, and
    # whether the lanes overlap, is what is tested.
    def run(name, env):
        seen.append((name, env.get("CUDA_VISIBLE_DEVICES"), env.get("VLLM_CACHE_ROOT")))
        if name == "pipeline-fp8+kv-fp8":
            lane1_started.set()
        if name == "pipeline-fp8":
            assert lane1_started.wait(timeout=30), "lane 1 did not start while lane 0 was running"
        return [{"label": name, "requests_per_s": 1.0}]

    run_lanes([["pipeline-fp8", "pipeline-bf16"], ["pipeline-fp8+kv-fp8"]], run,
              lambda name, results: recorded.extend(results), tmp_path)
    gpus = {name: gpu for name, gpu, _ in seen}
    assert gpus == {"pipeline-fp8": "0", "pipeline-bf16": "0", "pipeline-fp8+kv-fp8": "1"}
    assert {cache for _, _, cache in seen} == {str(tmp_path / "lane-0" / "vllm-cache"),
                                               str(tmp_path / "lane-1" / "vllm-cache")}
    assert sorted((r["label"], r["lane"]) for r in recorded) == [
        ("pipeline-bf16", 0), ("pipeline-fp8", 0), ("pipeline-fp8+kv-fp8", 1)]


def test_one_lane_keeps_the_machines_gpus():
    from pathlib import Path

    from bench.gpu_throughput import lane_env

    assert lane_env(0, 1, Path("/tmp/bench")) == {}


def test_runs_queued_from_the_shell_while_a_lane_works_are_run(tmp_path):
    """`bench/gpu_session.sh queue` appends to the lane's queue file while its first run is going; the
    lane, lingering, picks the new run up. A misspelled run is refused by the script, not queued."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bench.gpu_throughput import run_lanes

    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "BENCH": str(tmp_path), "PYTHON": sys.executable}

    def queue(lane, runs):
        return subprocess.run(["bash", str(root / "bench" / "gpu_session.sh"), "queue", str(lane), runs],
                              env=env, capture_output=True, text=True)

    ran = []

    def run(name, env_):
        ran.append(name)
        if name == "pipeline-fp8":
            assert queue(0, "pipeline-fp8+kv-fp9").returncode != 0
            added = queue(0, "pipeline-fp8+kv-fp8,pipeline-bf16")
            assert added.returncode == 0, added.stderr
        return [{"label": name}]

    run_lanes([["pipeline-fp8"]], run, lambda name, results: None, tmp_path, linger_s=1, poll_s=0.1)
    assert ran == ["pipeline-fp8", "pipeline-fp8+kv-fp8", "pipeline-bf16"]
    assert (tmp_path / "lane-0.queue").read_text() == ""


def test_the_sampler_watches_only_the_gpus_a_lane_may_use():
    from bench.common import visible_nvml_indices

    assert visible_nvml_indices(4, "2") == [2]
    assert visible_nvml_indices(4, "0,3") == [0, 3]
    assert visible_nvml_indices(4, None) == [0, 1, 2, 3]
    assert visible_nvml_indices(4, "GPU-8f1c") == [0, 1, 2, 3]  # UUIDs: not mapped, every GPU
