"""docs/performance.md's result blocks are computed from the results files: every ratio pairs two runs of
the same file, plain vLLM is matched on the engine arguments it shares with the pipeline run, and each
card's block is rewritten without touching the others."""
import json

from bench.render_performance import main, markers, measured_ratios, render


def _run(label, rate, **extra):
    engine = "plain vLLM LLM.chat" if label.startswith("plain") else "pipeline (Ray Data + ray.data.llm)"
    return {"label": label, "workload": "W1", "requests_per_s": rate, "engine": engine, "card": "NVIDIA H200",
            "vllm": "0.26.0", **extra}


RESULTS = {
    "ceilings": {"card": "NVIDIA H200", "bf16_matmul_tflops": 795.4, "fp8_matmul_tflops": 1451.5,
                 "copy_bandwidth_tb_s": 4.24},
    "runs": [
        _run("pipeline-fp8", 28.0, lane=0), _run("pipeline-bf16", 25.0, lane=3),
        _run("pipeline-fp8+kv-fp8+seqs512", 40.0, lane=2), _run("pipeline-bf16+kv-fp8+seqs512", 36.0, lane=2),
        _run("plain-fp8", 16.0, lane=0), _run("plain-fp8+kv-fp8", 20.0, lane=0),
        {**_run("plain-fp8+kv-fp8", 100.0, lane=0), "workload": "text"},
        {"label": "pipeline-fp8+encoder-graphs", "failed": True, "exit": 1},
    ],
}


def test_every_ratio_pairs_like_with_like():
    ratios = dict(measured_ratios([r for r in RESULTS["runs"] if not r.get("failed")]))
    # The closest measured plain run: the one sharing most of the pipeline run's knobs (no plain run
    # with seqs512 was measured, so plain-fp8+kv-fp8), named in the ratio.
    assert ratios["pipeline-fp8+kv-fp8+seqs512 / plain-fp8+kv-fp8 (pipeline / plain vLLM), W1"] == "2.00x"
    assert ratios["pipeline-fp8 / plain-fp8 (pipeline / plain vLLM), W1"] == "1.75x"
    assert ratios["pipeline-fp8+kv-fp8+seqs512 / pipeline-bf16+kv-fp8+seqs512 (FP8 / BF16), W1"] == "1.11x"
    assert ratios["pipeline-fp8 / pipeline-bf16 (FP8 / BF16), W1"] == "1.12x"
    assert ratios["pipeline-fp8+kv-fp8+seqs512 / pipeline-fp8 (knobs vs default), W1"] == "1.43x"
    # No BF16 plain run: no pipeline / plain ratio for BF16, and no ratio across workloads.
    assert not any(name.startswith("pipeline-bf16") and "plain" in name for name in ratios)
    assert all("text" not in name for name in ratios)


def test_render_names_the_card_the_lanes_and_what_did_not_finish(tmp_path):
    text = render(RESULTS, tmp_path / "chart.png", "h200x4-test")
    begin, end = markers("h200x4-test")
    assert text.startswith(begin) and text.endswith(end)
    assert "**Card:** NVIDIA H200" in text
    assert "| pipeline-fp8+kv-fp8+seqs512 (pipeline (Ray Data + ray.data.llm)) | W1 | 40.0 |" in text
    assert text.count("| GPU |") == 1 and "| 2 |" in text
    assert "Did not finish in this run (the text below says why): pipeline-fp8+encoder-graphs." in text
    assert (tmp_path / "chart.png").stat().st_size > 0


def test_each_results_file_rewrites_only_its_own_block(tmp_path):
    results = tmp_path / "h200x4-test.json"
    results.write_text(json.dumps(RESULTS))
    other_begin, other_end = markers("h100-old")
    begin, end = markers("h200x4-test")
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Perf\n{other_begin}\nH100 table\n{other_end}\nprose\n{begin}\nstale\n{end}\ntail\n")
    main([str(results), "--doc", str(doc)])
    text = doc.read_text()
    assert "H100 table" in text and "prose" in text and text.rstrip().endswith("tail")
    assert "stale" not in text and "2.00x" in text
    assert (tmp_path / "h200x4-test-w1.png").exists()


def test_a_profiled_run_gets_its_kernel_table_beside_the_floor(tmp_path):
    breakdown = {"images": 256, "kernels": 400000, "vision_scope_found": True, "kernel_ms_per_image": 30.0, "kernel_bound_images_per_s": 33.3,
                 "ms_per_image": {"vision GEMMs": 6.0, "decoder attention": 9.0},
                 "share": {"vision GEMMs": 0.2, "decoder attention": 0.3},
                 "ms_per_image_by_step": {"prefill steps": {"vision GEMMs": 6.0, "decoder attention": 1.0},
                                          "decode-only steps": {"decoder attention": 8.0}}}
    runs = [*RESULTS["runs"], _run("engine-fp8", 30.0),
            {**_run("engine-fp8", 0.0), "workload": "W1-profiled", "kernel_breakdown": breakdown}]
    text = render({**RESULTS, "runs": runs}, tmp_path / "chart.png", "h100-test")
    assert "| decoder attention | 9.00 | 30% | 1.00 | 8.00 |" in text
    assert "**33.3 images/s**" in text and "256 requests, 400,000 kernels" in text
    ratios = dict(measured_ratios([r for r in runs if not r.get("failed")]))
    assert ratios["pipeline-fp8 / engine-fp8 (pipeline / its engine alone, all requests at once), W1"] == "0.93x"
    stock = {**breakdown, "vision_scope_found": False, "images": 64}
    runs[-1] = {**runs[-1], "label": "plain-fp8", "kernel_breakdown": stock}
    text = render({**RESULTS, "runs": runs}, tmp_path / "chart.png", "h100-test")
    assert "| decoder attention |" not in text  # stock vLLM's vision GEMMs would pass for the decoder's
    assert "`plain-fp8`'s profile (64 requests) is of stock vLLM" in text
