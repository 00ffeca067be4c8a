"""Baseline: plain vLLM `LLM.chat` on workload W1 (and text-only), as a user without the pipeline would.

    python -m bench.plain_vllm CHECKPOINT W1_PARQUET --label plain-fp8 [--n 512] [--text-n 512]

Engine settings are the seed's (max_num_seqs 256, gpu_memory_utilization 0.9, max_model_len 8192, CUDA
graphs) with vLLM's defaults otherwise, as measured for the GPU baseline (docs/notes.md: GPU baseline). Images are handed over already decoded
(PIL, 896 x 896): the most favourable input for plain vLLM, so the baseline is conservative.

It is vLLM as shipped: our vLLM plugin, installed on the benchmark machine for the pipeline, loads in
every vLLM process, and would apply our patch (pipeline/engine/patches.py) here too. It is switched off
unless PIPELINE_VLLM_RANGE_CACHE is set. (Plain runs before 2026-11-27's second lease had no patch
to switch off; those of that lease ran with it, which made plain vLLM faster, not slower.)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import GENERATED_TOKENS, TEXT_PROMPT, GpuSampler, card_name, emit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("w1_parquet")
    parser.add_argument("--label", required=True)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--text-n", type=int, default=512)
    parser.add_argument("--fast-images", action="store_true", help="use our uint8 Gemma 3 variant")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="K=V", help="extra engine args (JSON values)")
    parser.add_argument("--profile-dir", help="after the timed runs, profile W1 requests with torch's profiler")
    parser.add_argument("--profile-n", type=int, default=64,
                        help="requests to profile; 256, one whole wave at max_num_seqs 256, shows the steady state")
    parser.add_argument("--range-cache", action="store_true",
                        help="with our vLLM patch (pipeline/engine/patches.py), as the pipeline runs: the engine alone")
    args = parser.parse_args(argv)

    import os

    from pipeline.engine.patches import ENV_SWITCH, range_cache_enabled

    # Before vLLM starts its engine process, which inherits them.
    os.environ[ENV_SWITCH] = "1" if args.range_cache else os.environ.get(ENV_SWITCH, "0")
    if args.profile_dir:
        # vLLM's own ranges (and our vision tower's, pipeline/engine/gemma3.py) in the trace, for
        # bench.profile_breakdown; outside the profiler they cost a few microseconds per step.
        os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"
    import io
    import json

    import pyarrow.parquet as pq
    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams

    table = pq.read_table(args.w1_parquet).slice(0, args.n + 16 + (args.profile_n if args.profile_dir else 0))
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in table.column("image").to_pylist()]
    prompts = table.column("prompt").to_pylist()
    kwargs = dict(model=args.checkpoint, max_num_seqs=256, gpu_memory_utilization=0.9, max_model_len=8192,
                  limit_mm_per_prompt={"image": 1}, seed=0)
    if args.fast_images:
        kwargs["hf_overrides"] = {"architectures": ["Gemma3FastImagesForConditionalGeneration"]}
    if args.profile_dir:
        kwargs["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": args.profile_dir,
                                     "torch_profiler_with_stack": False, "torch_profiler_record_shapes": False}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        kwargs[key] = json.loads(value)
        if kwargs[key] is None:
            kwargs.pop(key)
    started = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=GENERATED_TOKENS, ignore_eos=True, temperature=0.0)

    def conversation(image, prompt):
        return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                             {"type": "text", "text": prompt}]}]

    llm.chat([conversation(images[i], prompts[i]) for i in range(16)], params, use_tqdm=False)  # warm-up
    engine = "plain vLLM LLM.chat" + (" + our Gemma 3 variant and patch" if args.fast_images and args.range_cache else "")
    common = {"label": args.label, "checkpoint": args.checkpoint, "engine": engine,
              "card": card_name(), "vllm": vllm.__version__, "startup_s": round(startup_s, 1),
              "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"},
              "range_cache": range_cache_enabled()}

    batch = [conversation(images[16 + i], prompts[16 + i]) for i in range(args.n)]
    sampler = GpuSampler().start()
    started = time.perf_counter()
    outputs = llm.chat(batch, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    emit({**common, "workload": "W1", "n": args.n, "seconds": round(seconds, 2),
          "requests_per_s": round(args.n / seconds, 2), "generated_tokens_per_s": round(generated / seconds, 1),
          "prompt_tokens_mean": round(sum(len(o.prompt_token_ids) for o in outputs) / args.n, 1),
          **sampler.stop()})

    if args.text_n:
        texts = [[{"role": "user", "content": f"{TEXT_PROMPT} (#{i})"}] for i in range(args.text_n)]
        llm.chat(texts[:16], params, use_tqdm=False)
        sampler = GpuSampler().start()
        started = time.perf_counter()
        outputs = llm.chat(texts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        emit({**common, "workload": "text", "n": args.text_n, "seconds": round(seconds, 2),
              "requests_per_s": round(args.text_n / seconds, 2),
              "generated_tokens_per_s": round(generated / seconds, 1),
              "prompt_tokens_mean": round(sum(len(o.prompt_token_ids) for o in outputs) / args.text_n, 1),
              **sampler.stop()})

    if args.profile_dir:
        # Not timed: the profiler slows the run. It shows where the engine's time goes with images.
        # Images not seen before where the file has them, so no cache of vLLM's skips any image work.
        first = 16 + args.n if len(images) >= 16 + args.n + args.profile_n else 0
        profiled = [conversation(images[(first + i) % len(images)], prompts[0]) for i in range(args.profile_n)]
        llm.start_profile()
        started = time.perf_counter()
        llm.chat(profiled, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        llm.stop_profile()
        result = {**common, "workload": "W1-profiled", "n": len(profiled), "seconds": round(seconds, 2),
                  "profile_dir": args.profile_dir}
        try:
            from bench.profile_breakdown import markdown, summarise_dir

            result["kernel_breakdown"] = summarise_dir(Path(args.profile_dir), images=len(profiled))
            print(markdown(result["kernel_breakdown"]), flush=True)
        except Exception as error:  # the timed results above stand without it
            result["kernel_breakdown_error"] = f"{type(error).__name__}: {error}"
        emit(result)


if __name__ == "__main__":
    main()
