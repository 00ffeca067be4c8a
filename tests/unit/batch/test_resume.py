"""Resume decisions over a local output prefix: fresh, resume, complete (no-op), refusals, attempts."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.config import PipelineConfig
from pipeline.batch.output_lease import LEASE_DIR
from pipeline.batch.resume import (ATTEMPTS_NAME, CHECKPOINT_DIR, MANIFEST_NAME, OutputExistsError, begin_attempt,
                             check_exactly_once, check_output_apart, end_attempt, fingerprint_input,
                             output_config_digest, output_settings, prepare_output, settings_differences)
from pipeline.io.storage import write_json


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
    pytest.param("sampling.max_tokens=12", r"other model, sampling.* \(sampling.max_tokens differ\)",
                 id="sampling-changed"),
    pytest.param("batch.default_prompt=Other", r"other model, sampling.* \(batch.default_prompt differ\)",
                 id="prompt-changed"),
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


def test_check_exactly_once_across_files_and_batches_with_a_missing_key(tmp_path):
    """Keys near 2**64 (half of all hashes exceed int64), duplicates across files, a null key."""
    big = 2**64 - 1
    _write_rows(tmp_path, "a.parquet", [big, 1, 5])
    _write_rows(tmp_path, "b.parquet", [7, big])
    assert check_exactly_once(pads.dataset(str(tmp_path), format="parquet"), 5) == \
        {"rows_out": 5, "distinct_row_keys": 4, "exactly_once": False}
    pq.write_table(pa.table({"row_hash": pa.array([9, None], pa.uint64())}), tmp_path / "c.parquet")
    (tmp_path / "b.parquet").unlink()
    result = check_exactly_once(pads.dataset(str(tmp_path), format="parquet"), 5)
    assert result == {"rows_out": 5, "distinct_row_keys": 4, "exactly_once": False}, "a row without key never counts"
    (tmp_path / "c.parquet").unlink()
    _write_rows(tmp_path, "c.parquet", [9, 2**63])
    assert check_exactly_once(pads.dataset(str(tmp_path), format="parquet"), 5)["exactly_once"] is True


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


def _complete(config, input_uri, output: Path) -> dict:
    """A complete output as run_caption leaves it: data, and a manifest with the run's fingerprint."""
    state = prepare_output(config, input_uri, str(output), overwrite=False)
    _write_rows(output, "data-0.parquet", [1, 2, 3])
    manifest = {"status": "complete", "counts": {"rows_in": 3, "rows_out": 3},
                "input_fingerprint": state.input_fingerprint, "output_config": state.output_config,
                "output_settings": state.output_settings}
    write_json(config.storage, str(output / MANIFEST_NAME), manifest)
    return manifest


@pytest.mark.parametrize("overrides, named", [
    pytest.param(["batch.default_prompt=Say something else."], "batch.default_prompt", id="prompt"),
    pytest.param(["batch.default_system=Be terse."], "batch.default_system", id="system"),
    pytest.param(["sampling.temperature=0.9", "sampling.max_tokens=7"], "sampling.max_tokens, sampling.temperature",
                 id="sampling"),
    pytest.param(["images.target_size_px=448"], "images.target_size_px", id="image-size"),
    pytest.param(["model.source=other/model"], "model.source", id="model"),
    pytest.param(["tools.builtins=[calculate]"], "tools.builtins", id="tools"),
    pytest.param(["engine.kv_cache_dtype=fp8"], "kv_cache_dtype", id="fp8-kv-cache-changes-numerics"),
])
def test_complete_output_made_with_other_settings_is_refused_naming_them(config, input_uri, tmp_path, overrides,
                                                                          named):
    output = tmp_path / "out"
    manifest = _complete(config, input_uri, output)
    assert prepare_output(config, input_uri, str(output), overwrite=False).complete, "same settings: a no-op"
    changed = PipelineConfig.load(overrides=overrides, environ={})
    with pytest.raises(OutputExistsError) as refused:
        prepare_output(changed, input_uri, str(output), overwrite=False)
    assert str(refused.value) == (
        f"{output} is complete made with other model, sampling, image, tool or prompt settings ({named} differ); "
        "its answers are not what this config asks for. Rerun with the same config, use another output prefix, "
        "or pass --overwrite to start over")
    assert json.loads((output / MANIFEST_NAME).read_text()) == manifest, "the refused run changed nothing"
    state = prepare_output(changed, input_uri, str(output), overwrite=True)
    assert state.mode == "fresh" and not (output / MANIFEST_NAME).exists()


def test_chat_template_counts_by_content(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages }}")
    config = PipelineConfig.load(overrides=[f"engine.chat_template={template}"], environ={})
    before = output_settings(config)
    template.write_text("{{ messages | reverse }}")
    assert settings_differences(before, output_settings(config)) == ["template_sha256.engine.chat_template"]


def test_settings_differences_names_changed_keys_and_new_ones_off_their_default():
    recorded, current = {"a": {"b": 1, "c": 2}, "gone": None}, {"a": {"b": 1, "c": 3}, "new": 1, "other": 5}
    assert settings_differences(recorded, current, defaults={"new": 1, "other": 0}) == ["a.c", "other"]


@pytest.mark.parametrize("value, refused", [pytest.param(None, False, id="new-setting-at-its-default"),
                                            pytest.param("12", True, id="new-setting-changed")])
def test_a_setting_added_since_the_output_was_written(config, input_uri, tmp_path, value, refused):
    """An output written before a release added a field: the field at its default does not disown it."""
    output = tmp_path / "out"
    manifest = _complete(config, input_uri, output)
    del manifest["output_settings"]["sampling"]["max_tokens"]
    manifest["output_config"] = "written-by-an-older-release"
    write_json(config.storage, str(output / MANIFEST_NAME), manifest)
    current = config if value is None else PipelineConfig.load(overrides=[f"sampling.max_tokens={value}"],
                                                               environ={})
    if refused:
        with pytest.raises(OutputExistsError, match=r"\(sampling.max_tokens differ\)"):
            prepare_output(current, input_uri, str(output), overwrite=False)
    else:
        assert prepare_output(current, input_uri, str(output), overwrite=False).complete


def test_the_lease_is_not_output_and_survives_overwrite(config, input_uri, tmp_path):
    output = tmp_path / "out"
    (output / LEASE_DIR).mkdir(parents=True)
    (output / LEASE_DIR / "000001.json").write_text("{}")
    assert prepare_output(config, input_uri, str(output), overwrite=False).mode == "fresh"
    _write_rows(output, "data-0.parquet", [1])
    (output / "nested").mkdir()
    (output / "nested" / "x.parquet").write_bytes(b"x")
    prepare_output(config, input_uri, str(output), overwrite=True)
    assert [p.name for p in output.iterdir()] == [LEASE_DIR]
    assert (output / LEASE_DIR / "000001.json").read_text() == "{}"


@pytest.mark.parametrize("inputs, output, refused", [
    pytest.param("s3://b/out/in", "s3://b/out", "contains the input", id="s3-input-under-output"),
    pytest.param("s3://b/out/", "s3://b/out", "contains the input", id="s3-equal"),
    pytest.param(["s3://b/x/a.parquet", "s3://b/out/b.parquet"], "s3://b/out//", "contains the input",
                 id="s3-listed-file-under-output"),
    pytest.param("s3://b/in", "s3://b/in/out", "lies inside the input prefix", id="s3-output-under-input"),
    pytest.param("s3://b/out-in", "s3://b/out", None, id="s3-sibling-sharing-a-name-prefix"),
    pytest.param("s3://other/out/in", "s3://b/out", None, id="s3-other-bucket"),
    pytest.param("/data/out/in", "s3://data/out", None, id="local-and-s3"),
])
def test_check_output_apart(inputs, output, refused):
    if refused is None:
        check_output_apart(inputs, output)
    else:
        with pytest.raises(OutputExistsError, match=refused):
            check_output_apart(inputs, output)


def test_check_output_apart_resolves_local_paths_and_symlinks(tmp_path, monkeypatch):
    (tmp_path / "out" / "in").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "out" / "in")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputExistsError, match="contains the input"):
        check_output_apart(str(tmp_path / "link"), "out")
    with pytest.raises(OutputExistsError, match="contains the input"):
        check_output_apart("file://" + str(tmp_path / "out" / "in" / ".." / "in"), "./out/")
    check_output_apart(str(tmp_path / "other"), "out")
