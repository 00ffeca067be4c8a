import pyarrow as pa
import pytest

from pipeline.io import records as R


def row(**fields):
    return {"id": "a", "image": b"x", "image_uri": None, "prompt": None, "system": None, **fields}


@pytest.mark.parametrize("fields, kind", [
    pytest.param({"id": None}, R.ErrorKind.MISSING_ID, id="null-id"),
    pytest.param({"id": "  "}, R.ErrorKind.MISSING_ID, id="blank-id"),
    pytest.param({"id": "dup"}, R.ErrorKind.DUPLICATE_ID, id="duplicate"),
    pytest.param({"image": None}, R.ErrorKind.MISSING_IMAGE, id="no-image"),
    pytest.param({"image": None, "image_uri": " "}, R.ErrorKind.MISSING_IMAGE, id="blank-uri"),
    pytest.param({"image_uri": "s3://b/k"}, R.ErrorKind.INVALID_RECORD, id="both-image-and-uri"),
    pytest.param({"prompt": 3}, R.ErrorKind.INVALID_RECORD, id="prompt-not-string"),
])
def test_invalid_records(fields, kind):
    with pytest.raises(R.RecordError) as info:
        R.validate_record(row(**fields), frozenset({"dup"}))
    assert info.value.kind == kind and info.value.stage == R.Stage.VALIDATE


def test_valid_records_pass():
    R.validate_record(row(), frozenset())
    R.validate_record(row(image=None, image_uri="s3://b/k", prompt="p", system="s"), frozenset())


def test_error_columns_carry_kind_and_message():
    columns = R.RecordError(R.ErrorKind.NOT_FOUND, "s3://b/k: NoSuchKey", R.Stage.FETCH).as_columns()
    assert columns == {"_error": "not_found: s3://b/k: NoSuchKey", "_error_kind": "not_found", "_error_stage": "fetch"}


def test_output_schema_passes_through_other_columns_with_their_types():
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()),
                        ("label", pa.int32()), ("text", pa.string())])
    out = R.output_schema(schema)
    assert out.names[:len(R.OUTPUT_FIELDS)] == [f.name for f in R.OUTPUT_FIELDS]
    assert out.field("label").type == pa.int32() and "image" not in out.names
    # an input column named like an output column is not duplicated
    assert out.names.count("text") == 1
    with pytest.raises(ValueError, match="does not have"):
        R.output_schema(schema, ["nope"])


@pytest.mark.parametrize("schema, problem", [
    (pa.schema([("image", pa.binary())]), "no 'id' column"),
    (pa.schema([("id", pa.string())]), "neither an 'image'"),
    (pa.schema([("id", pa.string()), ("image", pa.string())]), "'image' has type string, expected binary"),
])
def test_input_schema_problems(schema, problem):
    assert any(problem in p for p in R.check_input_schema(schema))
