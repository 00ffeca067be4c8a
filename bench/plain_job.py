"""Plain vLLM doing the caption job end to end in one process, as a user without the pipeline would.

    python -m bench.plain_job CHECKPOINT --input DIR --output DIR [--max-tokens 128] [--chunk 2000]
        [--engine-arg K=JSON ...]

Read the parquet records (pyarrow), decode and resize each JPEG with PIL to the model's 896 x 896, hand
them to `LLM.chat` with the record's prompt, write id, text, token counts and finish reason as parquet.
bench/job_run.py starts it as a subprocess and times it from process start to the output written, as it
times `jobs.caption`; engine start (the `LLM(...)` constructor) is reported apart.

Engine settings are the seed's, as in bench/plain_vllm.py (max_num_seqs 256, gpu_memory_utilization 0.9,
max_model_len 8192, CUDA graphs, one image per prompt), sampling the benchmark's (temperature 0,
`--max-tokens` generated tokens with ignore_eos). Our vLLM plugin is installed on the benchmark machine:
its patch is switched off here (PIPELINE_VLLM_RANGE_CACHE=0), so this is vLLM as shipped.

Rows go to `LLM.chat` `--chunk` at a time (decode a chunk, generate it, next chunk): 10,000 decoded 896 px
images are ~24 GB of pixels before vLLM makes its own processed copies, which a user with a large dataset
would not hold at once. The engine idles while a chunk is decoded: that is plain vLLM's cost, measured.

Each step prints `EVENT name epoch_seconds` (engine_ready, chunk_decoded, chunk_generated, written) and the
last line is `RESULT {...}` (bench.common.emit).
CPU check (tiny model): see bench/job_run.py, which runs this with the tiny config's engine arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from bench.common import GENERATED_TOKENS, emit

SEED_ENGINE = {"max_num_seqs": 256, "gpu_memory_utilization": 0.9, "max_model_len": 8192,
               "limit_mm_per_prompt": {"image": 1}, "seed": 0}
IMAGE_SIDE = 896  # Gemma 3's SigLIP input: what vLLM's processor would resize to anyway


def event(name: str, **extra) -> float:
    now = time.time()
    print(f"EVENT {name} {now:.3f} {json.dumps(extra) if extra else ''}".rstrip(), flush=True)
    return now


def engine_kwargs(checkpoint: str, engine_args: list[str]) -> dict:
    kwargs = {"model": checkpoint, **SEED_ENGINE}
    for item in engine_args:
        key, _, value = item.partition("=")
        kwargs[key] = json.loads(value)
        if kwargs[key] is None:
            kwargs.pop(key)
    return kwargs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--input", required=True, help="folder of parquet records (id, image, prompt)")
    parser.add_argument("--output", required=True, help="folder for the output parquet")
    parser.add_argument("--max-tokens", type=int, default=GENERATED_TOKENS)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--engine-arg", action="append", default=[], metavar="K=JSON")
    args = parser.parse_args(argv)
    started = time.time()

    # vLLM as shipped: our plugin's patch stays off in this process and the engine's (it inherits this).
    os.environ["PIPELINE_VLLM_RANGE_CACHE"] = "0"
    import io
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(args.checkpoint, args.engine_arg)
    llm = LLM(**kwargs)
    ready = event("engine_ready")
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)

    files = sorted(str(p) for p in Path(args.input).glob("*.parquet"))
    table = pq.read_table(files, columns=["id", "image", "prompt"])
    ids, prompts = table.column("id").to_pylist(), table.column("prompt").to_pylist()
    images_column = table.column("image")
    texts, prompt_tokens, completion_tokens, finish = [], [], [], []
    decode_s = generate_s = 0.0
    for start in range(0, table.num_rows, args.chunk):
        stop = min(start + args.chunk, table.num_rows)
        t = time.time()
        conversations = []
        for i in range(start, stop):
            image = Image.open(io.BytesIO(images_column[i].as_py())).convert("RGB")
            image = image.resize((IMAGE_SIDE, IMAGE_SIDE), Image.BICUBIC)
            conversations.append([{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                                                {"type": "text", "text": prompts[i]}]}])
        decode_s += event("chunk_decoded", rows=stop - start) - t
        t = time.time()
        outputs = llm.chat(conversations, params, use_tqdm=False)
        generate_s += event("chunk_generated", rows=len(outputs)) - t
        for output in outputs:
            texts.append(output.outputs[0].text)
            prompt_tokens.append(len(output.prompt_token_ids))
            completion_tokens.append(len(output.outputs[0].token_ids))
            finish.append(output.outputs[0].finish_reason)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": texts, "prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens, "finish_reason": finish}),
                   out / "part-00000.parquet")
    written = event("written", rows=len(texts))
    import vllm

    emit({"engine": "plain vLLM LLM.chat", "vllm": vllm.__version__, "rows": len(texts),
          "engine_start_s": round(ready - started, 2), "decode_s": round(decode_s, 2),
          "generate_s": round(generate_s, 2), "in_process_s": round(written - started, 2),
          "generated_tokens": sum(completion_tokens), "chunk": args.chunk,
          "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1) if prompt_tokens else None,
          "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"}})


if __name__ == "__main__":
    main()
