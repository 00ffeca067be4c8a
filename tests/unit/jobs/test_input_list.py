"""jobs.caption --input-list: the file names exactly the parquet files to caption (a schedule tick's set)."""
import logging

import pytest

from jobs import caption
from pipeline.batch.caption import InputError, _input_location, load_input_list
from pipeline.config import PipelineConfig


def test_list_lines_blanks_and_comments(tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text("# tick 1\n/data/a.parquet\n\n  /data/b.parquet  \n")
    assert load_input_list(PipelineConfig(), str(listing)) == ["/data/a.parquet", "/data/b.parquet"]


@pytest.mark.parametrize("content, message", [
    pytest.param(None, "does not exist", id="missing"),
    pytest.param("# nothing\n\n", "names no file", id="empty"),
])
def test_unusable_list_exits_2_before_any_model_or_ray(tmp_path, caplog, content, message):
    listing = tmp_path / "inputs.txt"
    if content is not None:
        listing.write_text(content)
    with caplog.at_level(logging.ERROR, logger="jobs.caption"):
        code = caption.main(["--input-list", str(listing), "--output", str(tmp_path / "out")])
    assert code == 2 and message in caplog.text


def test_listed_files_share_one_filesystem():
    config = PipelineConfig()
    fs, paths = _input_location(config, ["/data/a.parquet", "file:///data/b.parquet"])
    assert paths == ["/data/a.parquet", "/data/b.parquet"] and type(fs).__name__ == "LocalFileSystem"
    with pytest.raises(InputError, match="mixes local paths and s3://"):
        _input_location(config, ["/data/a.parquet", "s3://bucket/b.parquet"])
    with pytest.raises(InputError, match="empty"):
        _input_location(config, [])


def test_input_and_input_list_exclude_each_other():
    with pytest.raises(SystemExit):
        caption.parse_args(["--input", "a", "--input-list", "b", "--output", "o"])
