"""Print a caption run's manifest summary and a few of its output rows.

    python -m jobs.show_output OUTPUT_PREFIX [--rows 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

import pyarrow.dataset as pads

from pipeline.config import PipelineConfig
from pipeline.storage import join, make_filesystem, read_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.show_output", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="output prefix of a caption run (local path or s3://)")
    parser.add_argument("--rows", type=int, default=5)
    args = parser.parse_args(argv)
    storage = PipelineConfig.load().storage
    manifest = read_json(storage, join(args.output, "_manifest.json"))
    if manifest is None:
        print(f"no manifest under {args.output}: the run did not finish", file=sys.stderr)
        return 1
    counts, speed = manifest["counts"], manifest["throughput"]
    print(f"output: {args.output} ({len(manifest['files'])} parquet files, manifest _manifest.json)")
    print(f"rows: {counts['rows_out']} of {counts['rows_in']} | ok {counts['ok']} | errors {counts['errors']} "
          f"{json.dumps(counts['errors_by_kind'])} | {speed['rows_per_s']} rows/s, "
          f"{speed['completion_tokens_per_s']} generated tokens/s over {manifest['wall_s']} s")
    fs, path = make_filesystem(storage, args.output)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["id", "text", "finish_reason", "completion_tokens", "error"])
    for row in sorted(table.to_pylist(), key=lambda r: r["id"] or "")[: args.rows]:
        body = row["text"] if row["error"] is None else f"ERROR {row['error']}"
        print(f"- {row['id']} [{row['finish_reason'] or '-'}, {row['completion_tokens'] or 0} tokens]: "
              + textwrap.shorten(body or "", width=110))
    return 0


if __name__ == "__main__":
    sys.exit(main())
