"""bench.profile_breakdown on a hand-made trace in the Chrome format torch's profiler writes. The trace is
synthetic (no GPU here); its kernel names are those of the 2026-11-26 H100 profile of W1 under FP8."""
import gzip
import json

import pytest

from bench.profile_breakdown import VISION_SCOPE, breakdown, part_of, summarise_dir
from pipeline.engine.gemma3 import VISION_SCOPE as MODEL_VISION_SCOPE

ENGINE = (1, 10)  # pid, tid of the engine core's main thread
GPU = (1, 7)      # the stream's "thread"


class Trace:
    """CPU ranges and launches on the engine thread; each launch runs a kernel on the GPU later."""

    def __init__(self):
        self.events, self.correlation = [], 0

    def cpu_range(self, name, ts, dur):
        self.events.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": ENGINE[0],
                            "tid": ENGINE[1], "ts": ts, "dur": dur})

    def launch(self, kernel, cpu_ts, gpu_ts, dur, category="kernel"):
        self.correlation += 1
        self.events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": ENGINE[0],
                            "tid": ENGINE[1], "ts": cpu_ts, "dur": 2, "args": {"correlation": self.correlation}})
        self.events.append({"ph": "X", "cat": category, "name": kernel, "pid": GPU[0], "tid": GPU[1],
                            "ts": gpu_ts, "dur": dur, "args": {"correlation": self.correlation}})


def two_steps() -> Trace:
    """A prefill step that encodes images, then a decode-only step; the GPU runs each kernel ~1 ms
    after its launch, so a kernel's own time stamp is already past the CPU range that launched it."""
    trace = Trace()
    trace.cpu_range("execute_context_2(658)_generation_0(0)", 0, 100)
    trace.cpu_range(VISION_SCOPE, 10, 40)
    trace.launch("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN", 12, 1000, 300)
    trace.launch("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90>>", 20, 1300, 200)
    trace.launch("void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl>", 30, 1500, 50)
    trace.launch("void cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8>", 60, 1550, 100)
    trace.launch("kernel_unified_attention", 70, 1650, 40)
    trace.cpu_range("execute_context_0(0)_generation_2(2)", 200, 100)
    trace.launch("void cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8>", 210, 2000, 20)
    trace.launch("triton_red_fused__to_copy_abs_clamp_cutlass_scaled_mm_0", 220, 2020, 5)
    trace.launch("kernel_unified_attention", 230, 2025, 30)
    trace.launch("reshape_and_cache_kernel_flash", 240, 2055, 3)
    trace.launch("Memcpy HtoD (Pinned -> Device)", 250, 2100, 2, category="gpu_memcpy")
    trace.launch("_gumbel_sample_kernel", 400, 2200, 10)  # sampling runs after the step's range
    return trace


def test_the_model_and_the_breakdown_name_the_same_range():
    assert VISION_SCOPE == MODEL_VISION_SCOPE


def test_kernels_are_attributed_by_the_cpu_range_that_launched_them():
    result = breakdown(two_steps().events, images=2)
    ms = result["ms_per_image"]
    assert ms["vision GEMMs"] == pytest.approx(0.150)       # 300 us over 2 images
    assert ms["vision attention"] == pytest.approx(0.100)
    assert ms["vision other"] == pytest.approx(0.025)
    assert ms["decoder GEMMs"] == pytest.approx(0.060)      # 100 + 20 us: the FP8 GEMM outside the vision range
    assert ms["decoder attention"] == pytest.approx(0.035)
    assert ms["decoder fused Triton (norms, quantisation)"] == pytest.approx(0.0025)
    assert ms["KV-cache writes"] == pytest.approx(0.0015)
    assert ms["copies"] == pytest.approx(0.001)
    assert ms["sampling"] == pytest.approx(0.005)
    assert result["kernel_ms"] == pytest.approx(0.76)
    assert result["vision_scope_found"] and result["step_ranges_found"]
    steps = result["ms_per_image_by_step"]
    assert steps["prefill steps"]["vision GEMMs"] == pytest.approx(0.150)
    assert steps["decode-only steps"]["decoder attention"] == pytest.approx(0.015)
    assert steps["outside any step"] == {"sampling": pytest.approx(0.005)}


def test_gpu_busy_share_counts_overlapping_kernels_once():
    trace = Trace()
    trace.launch("a_gemm", 0, 0, 100)
    trace.launch("b_gemm", 1, 50, 100)   # overlaps the first: busy 0-150
    trace.launch("c_gemm", 2, 250, 50)   # idle 150-250
    result = breakdown(trace.events, images=1)
    assert result["gpu_span_ms"] == pytest.approx(0.3)
    assert result["gpu_busy_share"] == pytest.approx(200 / 300, abs=0.001)
    assert result["kernel_bound_images_per_s"] == pytest.approx(1 / 250e-6, rel=0.01)


def test_without_our_vision_range_nothing_is_called_vision():
    """Stock vLLM's Gemma 3 has no such range: its FA3 kernels must not pass for the decoder's attention."""
    assert part_of("void cutlass::device_kernel<flash::enable_sm90_or_later<...>>", in_vision=False) == "other"
    events = [e for e in two_steps().events if e.get("name") != VISION_SCOPE]
    result = breakdown(events, images=2)
    assert not result["vision_scope_found"]
    assert not any(part.startswith("vision") for part in result["ms_per_image"])


def test_the_engine_trace_is_picked_among_the_files(tmp_path):
    with gzip.open(tmp_path / "engine.1.pt.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": two_steps().events}, f)
    (tmp_path / "frontend.2.pt.trace.json").write_text(json.dumps({"traceEvents": []}))
    result = summarise_dir(tmp_path, images=2)
    assert result["trace"] == "engine.1.pt.trace.json.gz" and result["kernels"] == 11
    with pytest.raises(FileNotFoundError):
        summarise_dir(tmp_path / "nothing-here", images=1)
