"""Resume decisions over a local output prefix: fresh, resume, complete (no-op), refusals, attempts."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.config import PipelineConfig
from pipeline.resume import (ATTEMPTS_NAME, CHECKPOINT_DIR, MANIFEST_NAME, OutputExistsError, begin_attempt,
                             check_exactly_once, end_attempt, fingerprint_input, output_config_digest,
                             prepare_output)
from pipeline.storage import write_json


@pytest.fixture
def config() -> PipelineConfig:
    return PipelineConfig.load(environ={})


@pytest.fixture
def input_uri(tmp_path) -> str:
    folder = tmp_path / "input"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"]}), folder / "part-0.parquet")
    return str(folder)


def _write_rows(path: Path, name: str, keys: list[int]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"row_hash": pa.array(keys, pa.uint64())}), path / name)


def _started(config, input_uri, output: Path) -> None:
    """What a killed first attempt leaves: its attempts record, two committed blocks, one pending."""
    state = prepare_output(config, input_uri, str(output), overwrite=False)
    begin_attempt(config, state, input_uri)
    _write_rows(output, "data-0.parquet", [1, 2])
    _write_rows(output / CHECKPOINT_DIR, "w_000000.parquet", [1, 2])
    _write_rows(output / CHECKPOINT_DIR, "w_000001.parquet", [3])
    _write_rows(output / CHECKPOINT_DIR, "w_000002.pending.parquet", [4, 5])


def test_empty_output_starts_fresh(config, input_uri, tmp_path):
    state = prepare_output(config, input_uri, str(tmp_path / "out"), overwrite=False)
    assert (state.mode, state.rows_done, state.attempts) == ("fresh", 0, [])
    assert state.checkpoint_uri == str(tmp_path / "out" / CHECKPOINT_DIR)


def test_partial_output_resumes_and_counts_committed_rows(config, input_uri, tmp_path):
    output = tmp_path / "out"
    _started(config, input_uri, output)
    state = prepare_output(config, input_uri, str(output), overwrite=False)
    assert state.mode == "resume"
    assert state.rows_done == 3, "committed checkpoint rows only; the pending block is redone"
    attempt = begin_attempt(config, state, input_uri)
    record = json.loads((output / ATTEMPTS_NAME).read_text())
    assert [a["status"] for a in record["attempts"]] == ["interrupted", "running"]
    assert record["attempts"][1]["rows_done_before"] == 3 and record["attempts"][1]["mode"] == "resume"
    end_attempt(config, state, input_uri, attempt, "complete", engine_requests=7)
    record = json.loads((output / ATTEMPTS_NAME).read_text())
    assert record["attempts"][1]["status"] == "complete" and record["attempts"][1]["engine_requests"] == 7
    assert "started_s" not in record["attempts"][1] and record["attempts"][1]["wall_s"] >= 0


@pytest.mark.parametrize("override, message", [
    pytest.param("sampling.max_tokens=12", "other model, sampling", id="sampling-changed"),
    pytest.param("batch.default_prompt=Other", "other model, sampling", id="prompt-changed"),
])
def test_partial_output_refuses_another_output_config(config, input_uri, tmp_path, override, message):
    output = tmp_path / "out"
    _started(config, input_uri, output)
    other = PipelineConfig.load(overrides=[override], environ={})
    with pytest.raises(OutputExistsError, match=message):
        prepare_output(other, input_uri, str(output), overwrite=False)


def test_sizing_changes_do_not_block_resume(config, input_uri, tmp_path):
    output = tmp_path / "out"
    _started(config, input_uri, output)
    resized = PipelineConfig.load(overrides=["batch.engine_replicas=4", "engine.max_num_seqs=64",
                                             "batch.rows_per_block=32"], environ={})
    assert prepare_output(resized, input_uri, str(output), overwrite=False).mode == "resume"


def test_partial_output_refuses_changed_input(config, input_uri, tmp_path):
    output = tmp_path / "out"
    _started(config, input_uri, output)
    pq.write_table(pa.table({"id": ["d"]}), Path(input_uri) / "part-1.parquet")
    with pytest.raises(OutputExistsError, match="other input files"):
        prepare_output(config, input_uri, str(output), overwrite=False)


def test_foreign_files_are_refused_and_overwrite_clears_them(config, input_uri, tmp_path):
    output = tmp_path / "out"
    _write_rows(output, "someone-elses.parquet", [9])
    with pytest.raises(OutputExistsError, match="not the output of a resumable run"):
        prepare_output(config, input_uri, str(output), overwrite=False)
    state = prepare_output(config, input_uri, str(output), overwrite=True)
    assert state.mode == "fresh" and list(output.iterdir()) == []


def test_complete_output_is_a_no_op_and_drops_a_leftover_checkpoint(config, input_uri, tmp_path):
    output = tmp_path / "out"
    _started(config, input_uri, output)
    manifest = {"status": "complete", "counts": {"rows_in": 3, "rows_out": 3},
                "input_fingerprint": fingerprint_input(config, input_uri)}
    write_json(config.storage, str(output / MANIFEST_NAME), manifest)
    state = prepare_output(config, input_uri, str(output), overwrite=False)
    assert state.complete and state.manifest == manifest
    assert not (output / CHECKPOINT_DIR).exists()
    assert (output / "data-0.parquet").exists(), "the output itself is left as it is"


def test_complete_output_for_another_input_is_refused(config, input_uri, tmp_path):
    output = tmp_path / "out"
    manifest = {"status": "complete", "counts": {"rows_in": 3, "rows_out": 3},
                "input_fingerprint": {"files": 9, "bytes": 1, "digest": "x"}}
    write_json(config.storage, str(output / MANIFEST_NAME), manifest)
    with pytest.raises(OutputExistsError, match="is complete for other input files"):
        prepare_output(config, input_uri, str(output), overwrite=False)


@pytest.mark.parametrize("keys, rows_in, expected", [
    pytest.param([1, 2, 3], 3, True, id="exactly-once"),
    pytest.param([1, 2, 2], 3, False, id="duplicate"),
    pytest.param([1, 2], 3, False, id="missing"),
])
def test_check_exactly_once(tmp_path, keys, rows_in, expected):
    _write_rows(tmp_path, "part.parquet", keys)
    result = check_exactly_once(pads.dataset(str(tmp_path), format="parquet"), rows_in)
    assert result["exactly_once"] is expected and result["distinct_row_keys"] == len(set(keys))


def test_output_config_digest_follows_output_shaping_settings_only():
    base = output_config_digest(PipelineConfig.load(environ={}))
    assert output_config_digest(PipelineConfig.load(overrides=["batch.engine_batch_size=8"], environ={})) == base
    assert output_config_digest(PipelineConfig.load(overrides=["storage.max_attempts=3"], environ={})) == base
    assert output_config_digest(PipelineConfig.load(overrides=["sampling.temperature=0.7"], environ={})) != base
    assert output_config_digest(PipelineConfig.load(overrides=["model.source=other/model"], environ={})) != base


def test_local_json_is_replaced_atomically(config, tmp_path):
    target = tmp_path / "dir" / "doc.json"
    write_json(config.storage, str(target), {"a": 1})
    write_json(config.storage, str(target), {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["doc.json"], "no temporary file left behind"
