"""One side of a parity run: one engine setting decodes the first records of an input greedily.

Run as its own process (`python -m pipeline.parity.side`, config JSON on stdin) so that each setting gets a
fresh engine and gives its GPU memory back when it exits; `pipeline.parity.run` starts one per setting.

The records are prepared exactly as the caption job prepares them (validation, fetch allow-list, decode,
resize: `PrepareRecords.prepare_one`; the chat: `engine_rows.chat_messages`), and the engine takes the
job's vLLM arguments (`engine_kwargs`), so what is compared is what a job would generate. Decoding is
greedy whatever `sampling` says: with sampling, two settings differ by chance, not by numerics.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from pipeline.config import PipelineConfig
from pipeline.io import records as R
from pipeline.io.storage import download_prefix, is_s3, make_filesystem
from pipeline.parity.compare import Decoded

logger = logging.getLogger("pipeline.parity.side")


def read_records(config: PipelineConfig, input_uri: str, rows: int) -> list[dict[str, Any]]:
    """The first `rows` records of a parquet file or prefix (local or s3://), in the dataset's file order."""
    import pyarrow.dataset as pads

    filesystem, path = make_filesystem(config.storage, input_uri)
    dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
    columns = [name for name in (R.ID, R.IMAGE, R.IMAGE_URI, R.PROMPT, R.SYSTEM) if name in dataset.schema.names]
    return dataset.head(rows, columns=columns).to_pylist()


def prepare_requests(config: PipelineConfig, records: list[dict[str, Any]], target) -> list[dict[str, Any]]:
    """Per record: {"id", "messages"} or {"id", "error"} (a record the job would write as an error row)."""
    from pipeline.stages.engine_rows import chat_messages
    from pipeline.stages.prepare import PrepareRecords

    prepare = PrepareRecords(config, target, frozenset())
    requests = []
    for row in records:
        try:
            image, _ = prepare.prepare_one(row)
        except R.RecordError as exc:
            requests.append({"id": row.get(R.ID), "error": f"{exc.kind.value}: {exc}"})
            continue
        prompt = row.get(R.PROMPT) or config.batch.default_prompt
        requests.append({"id": row.get(R.ID),
                         "messages": chat_messages(image, prompt, row.get(R.SYSTEM) or config.batch.default_system)})
    return requests


def _local_model(config: PipelineConfig, scratch: Path) -> str:
    """vLLM reads local directories and hub ids; an s3:// checkpoint is copied to scratch first."""
    source = config.model.source
    if not is_s3(source):
        return source
    download_prefix(config.storage, source, scratch)
    return str(scratch)


def decode(config: PipelineConfig, requests: list[dict[str, Any]], max_tokens: int, top_logprobs: int,
           chat_template: Optional[str]) -> list[Optional[Decoded]]:
    from vllm import LLM, SamplingParams

    from pipeline.engine.args import engine_kwargs

    with tempfile.TemporaryDirectory(prefix="parity-model-") as scratch:
        llm = LLM(model=_local_model(config, Path(scratch)), **engine_kwargs(config))
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=top_logprobs)
        chats = [r["messages"] for r in requests if "messages" in r]
        outputs = iter(llm.chat(chats, params, chat_template=chat_template, use_tqdm=False))
    decoded: list[Optional[Decoded]] = []
    for request in requests:
        if "messages" not in request:
            decoded.append(None)
            continue
        completion = next(outputs).outputs[0]
        top = tuple({int(t): float(lp.logprob) for t, lp in position.items()} for position in completion.logprobs or ())
        decoded.append(Decoded(tokens=tuple(completion.token_ids), top_logprobs=top, text=completion.text))
    return decoded


def run_side(config: PipelineConfig, input_uri: str, rows: int, max_tokens: int, top_logprobs: int) -> dict[str, Any]:
    from pipeline.batch.skeleton import plan_model

    model = plan_model(config)  # the job's checks: scheme, loadable layout, image size
    records = read_records(config, input_uri, rows)
    requests = prepare_requests(config, records, model.image_target)
    template = Path(config.engine.chat_template).read_text() if config.engine.chat_template else None
    decoded = decode(config, requests, max_tokens, top_logprobs, template)
    return {"records": [{"id": r["id"], "error": r.get("error"), "output": d.to_json() if d else None}
                        for r, d in zip(requests, decoded)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.parity.side", description=__doc__)
    parser.add_argument("--input", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--top-logprobs", type=int, required=True)
    parser.add_argument("--out", required=True, help="local JSON file for the result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = PipelineConfig.model_validate(json.load(sys.stdin))
    result = run_side(config, args.input, args.rows, args.max_tokens, args.top_logprobs)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
