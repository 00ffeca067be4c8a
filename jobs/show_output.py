"""Print a caption run's manifest summary and a few of its output rows, or write a gallery page of them.

    python -m jobs.show_output OUTPUT_PREFIX [--rows 5]
    python -m jobs.show_output OUTPUT_PREFIX --html rows.html --ids good-01 good-07
    python -m jobs.show_output OUTPUT_PREFIX --html sample.html --sample 50 --seed 3

`--html` writes one self-contained page (inline CSS, thumbnails as data URIs, no script) with each chosen
row's thumbnail, prompt, text or error, finish reason, tokens and tool calls: the rows of `--ids`, or a
seeded random sample of `--sample` rows (answered and error rows alike). Thumbnails are those the job
stored (`thumbnail` column); a row outside the job's thumbnail sample is shown without one, and nothing
is fetched again. Rows refused before their image decoded show their error message only.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.config import PipelineConfig
from pipeline.io.storage import join, make_filesystem, read_json, write_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.show_output", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="output prefix of a caption run (local path or s3://)")
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--html", metavar="FILE", help="write a gallery page of the chosen rows to FILE "
                        "(local path or s3://)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--ids", nargs="+", metavar="ID", help="with --html: the rows with these ids")
    chosen.add_argument("--sample", type=int, metavar="N", help="with --html: a seeded random sample of N rows "
                        "(default: report.gallery_size)")
    parser.add_argument("--seed", type=int, default=None, help="seed of --sample (default: report.gallery_seed)")
    args = parser.parse_args(argv)
    config = PipelineConfig.load()
    storage = config.storage
    manifest = read_json(storage, join(args.output, "_manifest.json"))
    if manifest is None:
        print(f"no manifest under {args.output}: the run did not finish", file=sys.stderr)
        return 1
    if args.html:
        return write_gallery(config, args.output, manifest, args.html, args.ids, args.sample, args.seed)
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


def write_gallery(config: PipelineConfig, output: str, manifest: dict, html_uri: str, ids: list[str] | None,
                  sample: int | None, seed: int | None) -> int:
    """The gallery page of the rows named by `ids`, or of `sample` rows picked by their seeded sample keys."""
    from pipeline.io import records as R
    from pipeline.report.gallery import sample_keys
    from pipeline.report.build import gallery_entries, load_output_columns, load_rows, run_default_prompt
    from pipeline.report.html import gallery_page

    table = load_output_columns(config, output)
    if ids is not None:
        wanted = set(ids)
        positions = [i for i, value in enumerate(table[R.ID].to_pylist()) if value in wanted]
        missing = sorted(wanted - {table[R.ID][i].as_py() for i in positions})
        if missing:
            print(f"no rows with id {', '.join(missing)} in {output}", file=sys.stderr)
        title = f"{len(positions)} rows of {output}"
    else:
        count = config.report.gallery_size if sample is None else sample
        hashes = table[R.ROW_HASH].to_pylist() if R.ROW_HASH in table.column_names else [None] * table.num_rows
        keys = sample_keys(hashes, table[R.ID].to_pylist(), config.report.gallery_seed if seed is None else seed)
        positions = sorted((i for i, k in enumerate(keys) if k is not None), key=keys.__getitem__)[:max(count, 0)]
        title = f"A sample of {len(positions)} rows of {output}"
    details = load_rows(config, output, table, positions) if positions else pa.table({})
    entries = gallery_entries(details, table, positions, run_default_prompt(config, manifest)) if positions else []
    write_bytes(config.storage, html_uri, gallery_page(title, entries, {}).encode())
    print(f"wrote {len(entries)} rows ({sum(e['thumbnail'] is not None for e in entries)} with a thumbnail) "
          f"to {html_uri}")
    return 0 if entries or not ids else 1


if __name__ == "__main__":
    sys.exit(main())
