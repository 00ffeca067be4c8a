"""A parity run: the baseline setting and the candidate setting, each in its own process, then the comparison.

One after the other, not side by side: on one GPU each setting gets the whole card, and each process
gives its memory back when it exits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.parity.compare import Decoded, as_rows, compare


class ParityError(RuntimeError):
    """A side that did not finish, or two sides that did not see the same records."""


def settings_diff(baseline: PipelineConfig, candidate: PipelineConfig) -> dict[str, list[Any]]:
    """Every config field the two settings set differently: {"engine.kv_cache_dtype": ["auto", "fp8"]}."""
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    before, after = flat(baseline.model_dump(mode="json")), flat(candidate.model_dump(mode="json"))
    return {key: [before.get(key), after.get(key)] for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)}


def _run_side(name: str, config: PipelineConfig, input_uri: str, rows: int, max_tokens: int, top_logprobs: int,
              scratch: Path) -> dict[str, Any]:
    out = scratch / f"{name}.json"
    env = {**os.environ, **config.runtime.process_env_vars()}
    command = [sys.executable, "-m", "pipeline.parity.side", "--input", input_uri, "--rows", str(rows),
               "--max-tokens", str(max_tokens), "--top-logprobs", str(top_logprobs), "--out", str(out)]
    done = subprocess.run(command, input=json.dumps(config.model_dump(mode="json")), text=True, env=env)
    if done.returncode != 0 or not out.exists():
        raise ParityError(f"the {name} setting did not finish (exit {done.returncode}); its log is above")
    return json.loads(out.read_text())


def run_parity(baseline: PipelineConfig, candidate: PipelineConfig, input_uri: str, *, rows: int,
               max_tokens: int, top_logprobs: int) -> dict[str, Any]:
    """The report: what differs, the summary numbers, and one entry per record."""
    with tempfile.TemporaryDirectory(prefix="parity-") as scratch:
        sides = {name: _run_side(name, config, input_uri, rows, max_tokens, top_logprobs, Path(scratch))
                 for name, config in (("baseline", baseline), ("candidate", candidate))}
    base, cand = sides["baseline"]["records"], sides["candidate"]["records"]
    if [r["id"] for r in base] != [r["id"] for r in cand]:
        raise ParityError("the two settings read different records; was the input written to in between?")
    compared = [(b, c) for b, c in zip(base, cand) if b["output"] is not None and c["output"] is not None]
    if not compared:
        errors = sorted({b["error"] or c["error"] for b, c in zip(base, cand)} - {None})
        raise ParityError(f"none of the {len(base)} records reached the engine: {'; '.join(errors[:3]) or 'no records'}")
    prompts, summary = compare([Decoded.from_json(b["output"]) for b, _ in compared],
                               [Decoded.from_json(c["output"]) for _, c in compared])
    per_record = [{"id": b["id"], **row, "baseline_text": b["output"]["text"], "candidate_text": c["output"]["text"]}
                  for (b, c), row in zip(compared, as_rows(prompts))]
    refused = [{"id": b["id"], "error": b["error"] or c["error"]} for b, c in zip(base, cand)
               if b["output"] is None or c["output"] is None]
    return {
        "input": input_uri,
        "model": baseline.model.source,
        "settings_diff": settings_diff(baseline, candidate),
        "decoding": {"greedy": True, "max_tokens": max_tokens, "top_logprobs": top_logprobs},
        "summary": summary,
        "refused_records": refused,
        "records": per_record,
    }
