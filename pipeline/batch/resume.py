"""Resume: rerunning a job over a partial output processes only what is missing, once.

The output prefix holds, besides the data files:

    _manifest.json   written last, only when the run finished; `status: complete` means every input row
                     has exactly one output row
    _attempts.json   one entry per run of the job over this output (started, finished or interrupted,
                     rows already done, engine requests, restarts), rewritten at each start and end
    _checkpoint/     Ray Data's checkpoint: the row keys of every committed output file; deleted once
                     the manifest says complete

One job at a time per prefix: the job holds the prefix's writer lease (pipeline.batch.output_lease, `_lease/`)
from before `prepare_output` to after the manifest, so a second job is refused before it changes anything.
An input inside the output prefix (or the output inside an input prefix) is refused (`check_output_apart`):
--overwrite would delete the input, and a rerun would read its own output as input.

How a rerun decides (`prepare_output`): a complete manifest for the same input and output-shaping settings
-> nothing to do (exit 0); for another input, or made with other settings -> refused, naming the settings
that differ (the old answers are not what this config asks for); files without a complete manifest ->
resume, if the input files and the output-shaping settings are those the earlier attempts recorded
(otherwise refused: the row keys are positions in the input files, and mixing two configs' answers in
one output would go unnoticed); `--overwrite` -> delete everything but the lease and start over.

Why Ray Data's checkpointing (`enable_checkpointing`), keyed on R.ROW_HASH rather than `id`: its filter
runs right after the read, so the key must exist in the rows the reader yields, and it must be unique and
non-null; `id` is neither for the records we must still write as errors (missing or repeated ids). Ray's
`row_hash` is made by the reader from the file path and row position. Its write is a two-phase commit:
a `.pending` checkpoint naming the data file's prefix is written before the data file and renamed after
it; on the next run, data files of a pending checkpoint are deleted before anything is read (Ray
2.60 `ray/data/_internal/planner/checkpoint/plan_write_op.py`, `checkpoint_filter.py`). A crash between
the data file and the checkpoint therefore loses that block's work but never duplicates it. We keep the
checkpoint after Ray's execution (`delete_checkpoint_on_success=False`) and delete it only after the
manifest is written: a crash in between would otherwise leave a full output without a checkpoint, and
the rerun would write every row again.

Visibility: an S3 object appears whole when its PUT or CompleteMultipartUpload succeeds, so a reader
never sees a partial file there. On a local disk Ray's parquet writer writes files in place: until the
next run cleans up, a crash can leave a truncated file, which that run deletes (it belongs to a pending
checkpoint). The manifest, written atomically, lists the files of a complete output.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Optional

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.io import records as R
from pipeline.config import PipelineConfig
from pipeline.engine.start import start_failure_in
from pipeline.batch.output_lease import LEASE_DIR
from pipeline.io.storage import abort_multipart_uploads, is_s3, join, make_filesystem, read_json, split_s3, write_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
ATTEMPTS_NAME = "_attempts.json"
CHECKPOINT_DIR = "_checkpoint"
_PENDING_SUFFIX = ".pending.parquet"  # Ray's uncommitted checkpoint files


class OutputExistsError(FileExistsError):
    """The output prefix holds something this run must not extend or replace without --overwrite."""


@dataclass
class OutputState:
    """What the output prefix holds when a run starts, and what this run will do about it."""

    uri: str
    filesystem: pafs.FileSystem
    path: str
    mode: Literal["fresh", "resume", "complete"]
    input_fingerprint: dict[str, Any]
    output_config: str
    output_settings: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    manifest: Optional[dict[str, Any]] = None
    rows_done: int = 0
    aborted_uploads: int = 0

    @property
    def complete(self) -> bool:
        return self.mode == "complete"

    @property
    def checkpoint_uri(self) -> str:
        return join(self.uri, CHECKPOINT_DIR)

    @property
    def checkpoint_path(self) -> str:
        return f"{self.path}/{CHECKPOINT_DIR}"


def fingerprint_input(config: PipelineConfig, input_uri: str | list[str]) -> dict[str, Any]:
    """The input's files and sizes, hashed: a rerun over changed files cannot reuse row keys.

    A listing only (no file is opened); hidden names (`_`, `.`) are skipped, as readers skip them. A list
    of inputs (jobs.schedule's --input-list) is fingerprinted as the union of its files."""
    files: set[tuple[str, int]] = set()
    for uri in [input_uri] if isinstance(input_uri, str) else input_uri:
        fs, path = make_filesystem(config.storage, uri)
        try:
            info = fs.get_file_info(path)
            infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(
                pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError:
            infos = []
        files.update((i.path, i.size or 0) for i in infos if i.type == pafs.FileType.File
                     and not any(part.startswith(("_", ".")) for part in i.path[len(path):].split("/") if part))
    ordered = sorted(files)
    digest = hashlib.sha256("\n".join(f"{f}\t{s}" for f, s in ordered).encode()).hexdigest() if ordered else None
    return {"files": len(ordered), "bytes": sum(s for _, s in ordered), "digest": digest}


def output_settings(config: PipelineConfig) -> dict[str, Any]:
    """The settings that shape output rows (model, sampling, images, fetch, tools, prompts, templates,
    columns): the run's config fingerprint, stored in _attempts.json and the manifest.

    Engine sizing, replicas, batch sizes and storage may change between attempts (a rerun on fewer GPUs);
    these may not. Chat templates count by content, not only by path.
    """
    batch = config.batch
    settings = {
        "model": config.model.model_dump(mode="json"),
        "sampling": config.sampling.model_dump(mode="json"),
        "images": config.images.model_dump(mode="json"),
        "fetch": config.fetch.model_dump(mode="json"),
        "tools": config.tools.model_dump(mode="json"),
        "chat_template": config.engine.chat_template,
        "template_sha256": {name: _file_sha256(path) for name, path in
                            (("engine.chat_template", config.engine.chat_template),
                             ("tools.chat_template", config.tools.chat_template)) if path},
        "batch": {"default_prompt": batch.default_prompt, "default_system": batch.default_system,
                  "passthrough_columns": batch.passthrough_columns},
    }
    # An fp8 KV cache changes the numbers, so outputs of two settings may not mix; 'auto' is left out
    # so that outputs written before the field existed still resume.
    if config.engine.kv_cache_dtype != "auto":
        settings["kv_cache_dtype"] = config.engine.kv_cache_dtype
    return settings


def output_config_digest(config: PipelineConfig) -> str:
    """A short hash of `output_settings`."""
    return _digest(output_settings(config))


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _file_sha256(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


def settings_differences(recorded: dict[str, Any], current: dict[str, Any],
                         defaults: Optional[dict[str, Any]] = None) -> list[str]:
    """The dotted names of the settings that differ between two `output_settings` (sorted).

    A setting the recorded run did not know (a field added to the config since) counts only when it is
    set away from its default (`defaults`: the `output_settings` of the default config); a setting that
    no longer exists does not count. So a new release with new fields does not disown old outputs."""
    old, new = _flatten(recorded), _flatten(current)
    base = _flatten(defaults) if defaults is not None else {}
    differing = {key for key in old.keys() & new.keys() if old[key] != new[key]}
    differing |= {key for key in new.keys() - old.keys() if key not in base or base[key] != new[key]}
    return sorted(differing)


_MISSING = object()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _check_same_settings(state: OutputState, recorded: dict[str, Any], uri: str, what: str) -> None:
    """Refuse an output made with other output-shaping settings, naming them. Outputs written before the
    fingerprint was recorded (no `output_config`) are taken as they are."""
    previous = recorded.get("output_config")
    if previous is None or previous == state.output_config:
        return
    differing: list[str] = []
    if isinstance(recorded.get("output_settings"), dict):
        differing = settings_differences(recorded["output_settings"], state.output_settings,
                                         output_settings(PipelineConfig()))
        if not differing:  # only settings added since, at their defaults
            return
    named = (f" ({', '.join(differing[:8])}{' ...' if len(differing) > 8 else ''} differ)" if differing else "")
    advice = ("resuming would mix two configurations' answers" if what == "holds a partial output" else
              "its answers are not what this config asks for")
    raise OutputExistsError(
        f"{uri} {what} made with other model, sampling, image, tool or prompt settings{named}; {advice}. "
        "Rerun with the same config, use another output prefix, or pass --overwrite to start over")


def check_output_apart(inputs: str | list[str], output_uri: str) -> None:
    """Refuse an output prefix that holds an input (equal, or the input under it; --overwrite would delete
    it, and the output's reader would take it for output rows) or that lies inside an input prefix (a
    rerun would read this run's output as input)."""
    output = _location(output_uri)
    for uri in [inputs] if isinstance(inputs, str) else inputs:
        source = _location(uri)
        if source[0] != output[0]:
            continue
        if _within(source[1], output[1]):
            raise OutputExistsError(
                f"the output prefix {output_uri} contains the input {uri}: refused (--overwrite would delete "
                "the input); write the output to a prefix outside the input")
        if _within(output[1], source[1]):
            raise OutputExistsError(
                f"the output prefix {output_uri} lies inside the input prefix {uri}: refused (a rerun would "
                "read this run's output as input); write the output to a prefix outside the input")


def _location(uri: str) -> tuple[str, str]:
    """(filesystem, normalized path): `s3` and bucket/key, or `local` and the real absolute path."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return "s3", "/".join(part for part in f"{bucket}/{key}".split("/") if part)
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return "local", os.path.realpath(os.path.abspath(local))


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def prepare_output(config: PipelineConfig, input_uri: str | list[str], output_uri: str, *, overwrite: bool,
                   committed_rows: Optional[Callable[[OutputState], int]] = None) -> OutputState:
    """Decide fresh / resume / complete for `output_uri`, clear it for --overwrite, and abort the
    multipart uploads a killed writer left under it. Raises OutputExistsError when a rerun must not go on.

    `committed_rows` counts what a resumed output already holds, the format's way (default: the rows of
    Ray Data's committed checkpoint files, as parquet outputs have them).

    Call it holding the prefix's lease (pipeline.batch.output_lease), which it leaves in place."""
    fs, path = make_filesystem(config.storage, output_uri)
    settings = output_settings(config)
    state = OutputState(uri=output_uri, filesystem=fs, path=path, mode="fresh",
                        input_fingerprint=fingerprint_input(config, input_uri),
                        output_config=_digest(settings), output_settings=settings)
    entries = output_entries(fs, path)
    if entries and overwrite:
        logger.warning("--overwrite: deleting %s (%d entries)", output_uri, len(entries))
        delete_entries(fs, entries)
        entries = []
    manifest = read_json(config.storage, join(output_uri, MANIFEST_NAME)) if entries else None
    record = read_json(config.storage, join(output_uri, ATTEMPTS_NAME)) if entries else None
    state.attempts = list((record or {}).get("attempts", []))
    if manifest is not None and manifest.get("status") == "complete":
        _check_same_input(state, manifest, output_uri, "is complete")
        _check_same_settings(state, manifest, output_uri, "is complete")
        state.mode, state.manifest = "complete", manifest
        _delete_checkpoint(state)  # left behind if the last run died right after its manifest
        logger.info("%s is already complete (%d rows for %d input rows); nothing to do (--overwrite redoes it)",
                    output_uri, manifest["counts"]["rows_out"], manifest["counts"]["rows_in"])
        return state
    if entries:
        if record is None:
            raise OutputExistsError(
                f"{output_uri} holds files but no {ATTEMPTS_NAME}: not the output of a resumable run; "
                "pass --overwrite to replace it")
        _check_same_input(state, record, output_uri, "holds a partial output")
        _check_same_settings(state, {"output_config": "unrecorded", **record}, output_uri, "holds a partial output")
        state.mode = "resume"
        state.rows_done = (committed_rows or count_committed_rows)(state)
    state.aborted_uploads = abort_multipart_uploads(config.storage, output_uri)
    logger.info("output %s: %s%s", output_uri, state.mode,
                f" ({state.rows_done} rows already committed by {len(state.attempts)} earlier attempts)"
                if state.mode == "resume" else "")
    return state


def output_entries(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The top-level entries of the output prefix, less the writer lease."""
    return [entry for entry in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
            if entry.base_name != LEASE_DIR]


def delete_entries(fs: pafs.FileSystem, entries: list[pafs.FileInfo]) -> None:
    """Delete these entries (files, or folders with their contents): --overwrite, which keeps the lease."""
    for entry in entries:
        if entry.type == pafs.FileType.Directory:
            fs.delete_dir(entry.path)
        else:
            fs.delete_file(entry.path)


def _check_same_input(state: OutputState, recorded: dict[str, Any], uri: str, what: str) -> None:
    previous = recorded.get("input_fingerprint")
    if previous is not None and previous != state.input_fingerprint:
        raise OutputExistsError(
            f"{uri} {what} for other input files ({previous['files']} files, {previous['bytes']} bytes; now "
            f"{state.input_fingerprint['files']} files, {state.input_fingerprint['bytes']} bytes); pass "
            "--overwrite to replace it")


def count_committed_rows(state: OutputState) -> int:
    """Rows in committed checkpoint files (pending ones belong to blocks the next execution redoes)."""
    selector = pafs.FileSelector(state.checkpoint_path, allow_not_found=True, recursive=False)
    files = [info.path for info in state.filesystem.get_file_info(selector)
             if info.type == pafs.FileType.File and info.path.endswith(".parquet")
             and not info.path.endswith(_PENDING_SUFFIX)]
    if not files:
        return 0
    return pads.dataset(files, filesystem=state.filesystem, format="parquet").count_rows()


def enable_checkpointing(dataset, state: OutputState) -> None:
    """Turn on Ray Data checkpointing for this dataset's execution only (its own DataContext copy, so no
    other dataset of the process is affected), keyed on R.ROW_HASH, stored under the output prefix."""
    from ray.data.checkpoint import CheckpointConfig

    dataset.context.checkpoint_config = CheckpointConfig(
        id_column=R.ROW_HASH, checkpoint_path=state.checkpoint_uri, override_filesystem=state.filesystem,
        delete_checkpoint_on_success=False)  # deleted after the manifest: see the module docstring
    logger.info("Ray Data checkpointing on: id_column=%s, checkpoint_path=%s (%s)", R.ROW_HASH,
                state.checkpoint_uri, state.mode)


def begin_attempt(config: PipelineConfig, state: OutputState, input_uri: str) -> dict[str, Any]:
    """Record this run in _attempts.json before any row is processed; earlier runs still marked running
    were killed (this job holds the prefix's lease, so no other job writes here now)."""
    for attempt in state.attempts:
        if attempt.get("status") == "running":
            attempt["status"] = "interrupted"
    attempt = {"attempt": len(state.attempts) + 1, "status": "running", "mode": state.mode,
               "started": _now(), "host": socket.gethostname(), "pid": os.getpid(),
               "rows_done_before": state.rows_done, "aborted_multipart_uploads": state.aborted_uploads,
               "started_s": time.time()}
    state.attempts.append(attempt)
    write_attempts(config, state, input_uri)
    return attempt


def end_attempt(config: PipelineConfig, state: OutputState, input_uri: str, attempt: dict[str, Any],
                status: str, **facts: Any) -> None:
    attempt.update(facts)
    attempt.update(status=status, finished=_now(), wall_s=round(time.time() - attempt["started_s"], 3))
    write_attempts(config, state, input_uri)


def fail_attempt(config: PipelineConfig, state: OutputState, input_uri: str, attempt: dict[str, Any],
                 error: BaseException, **facts: Any) -> None:
    """Mark the attempt failed with its error; never masks that error when the record cannot be written
    (storage down is one way to fail)."""
    cause = start_failure_in(error)  # an engine that never started: its root error, not Ray's wrapping
    message = f"EngineStartError: {cause}" if cause else f"{type(error).__name__}: {error}"
    try:
        end_attempt(config, state, input_uri, attempt, "failed", error=message[:2000], **facts)
    except Exception:
        logger.exception("could not record the failed attempt in %s", join(state.uri, ATTEMPTS_NAME))


def write_attempts(config: PipelineConfig, state: OutputState, input_uri: str) -> None:
    write_json(config.storage, join(state.uri, ATTEMPTS_NAME), {
        "input": input_uri, "output": state.uri, "input_fingerprint": state.input_fingerprint,
        "output_config": state.output_config, "output_settings": state.output_settings,
        "attempts": [_public(a) for a in state.attempts]})


def check_exactly_once(written: pads.Dataset, rows_in: int) -> dict[str, Any]:
    """Rows out, distinct row keys, and whether every input row has exactly one output row.

    The keys are read batch by batch into one uint64 array (8 bytes a row), sorted in place and counted
    where neighbours differ: no hash set and no Arrow table of the whole column, so 100M rows take the
    driver ~0.8 GB (docs/scale.md)."""
    import numpy as np

    rows = written.count_rows()
    keys = np.empty(rows, dtype=np.uint64)
    filled = nulls = 0
    for batch in written.to_batches(columns=[R.ROW_HASH]):
        column = batch.column(0)
        nulls += column.null_count
        values = column.drop_null().to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
        keys[filled:filled + len(values)] = values
        filled += len(values)
    keys = keys[:filled]
    keys.sort()
    distinct = int(np.count_nonzero(keys[1:] != keys[:-1])) + 1 if filled else 0
    return {"rows_out": rows, "distinct_row_keys": distinct,
            "exactly_once": rows == distinct == rows_in and nulls == 0}


def finish_manifest(manifest: dict[str, Any], state: OutputState, exactly_once: dict[str, Any]) -> dict[str, Any]:
    """Add resume facts to the manifest: complete means every input row has exactly one output row."""
    manifest["status"] = "complete" if exactly_once["exactly_once"] else "incomplete"
    manifest["input_fingerprint"] = state.input_fingerprint
    manifest["output_config"] = state.output_config
    manifest["output_settings"] = state.output_settings
    manifest["resume"] = {"row_key": R.ROW_HASH, **exactly_once}
    manifest["attempts"] = [_public(a) for a in state.attempts]
    return manifest


def finish_output(config: PipelineConfig, state: OutputState, manifest: dict[str, Any]) -> None:
    """After the manifest: a complete output no longer needs its checkpoint, and no upload under it may stay
    unfinished (a write that failed mid-upload and was retried can leave one behind)."""
    if manifest["status"] == "complete":
        _delete_checkpoint(state)
        abort_multipart_uploads(config.storage, state.uri)
    else:
        logger.error("%s is incomplete (%s); rerun the same command to finish it", state.uri, manifest["resume"])


def _delete_checkpoint(state: OutputState) -> None:
    info = state.filesystem.get_file_info(state.checkpoint_path)
    if info.type != pafs.FileType.NotFound:
        state.filesystem.delete_dir(state.checkpoint_path)
        logger.info("deleted the checkpoint %s", state.checkpoint_uri)


def _public(attempt: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attempt.items() if key != "started_s"}


def _now() -> str:
    return datetime.now(tz=timezone.utc).isoformat(timespec="seconds")
