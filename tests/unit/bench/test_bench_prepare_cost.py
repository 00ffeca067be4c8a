"""bench.prepare_cost: the cores-per-GPU arithmetic, the CPU-time median, the table, and the way it drives
ray.data.llm's stage UDFs (the real tokenize UDF of the batch job, on the tiny model's tokenizer)."""
import pytest

from bench import prepare_cost as P
from pipeline.stages.rendered_prompts import RenderedPromptTokenizeUDF, encode_rendered

W1_LIKE = {"read parquet": 0.0007, "fetch local file": 0.0001, "decode, full size": 0.003,
           "decode, draft mode": 0.003, "resize to 896": 0.0004, "prepare_image": 0.004,
           "PrepareRecords UDF": 0.008, "RequestBuilder": 0.0003, "prepare multimodal": 0.0005,
           "chat template": 0.0002, "tokenize": 0.0003, "engine front-end": 0.013}


def test_cores_per_gpu_sums_the_pool_stages_and_keeps_the_front_end_apart():
    d = P.cores_per_gpu(W1_LIKE, images_per_s=27.2, headroom=1.5)
    # Pools: read + PrepareRecords + RequestBuilder + 3 ray.data.llm stages; decode/resize are inside PrepareRecords.
    assert d["prepare_cpu_s_per_image"] == pytest.approx(0.0007 + 0.008 + 0.0003 + 0.0005 + 0.0002 + 0.0003)
    assert d["prepare_cores_per_gpu"] == pytest.approx(0.0100 * 27.2 * 1.5)
    assert d["prepare_cores_per_gpu_with_fetch"] == pytest.approx(0.0101 * 27.2 * 1.5)
    assert d["frontend_core_load"] == pytest.approx(0.013 * 27.2)
    assert d["frontend_ceiling_images_per_s"] == pytest.approx(1 / 0.013) and not d["frontend_is_ceiling"]
    assert P.cores_per_gpu({**W1_LIKE, "engine front-end": 0.05}, 27.2, 1.5)["frontend_is_ceiling"]


def test_cpu_seconds_per_item_is_the_median_pass_per_item(monkeypatch):
    # A process clock that advances 1 s per callee call, plus a 10 s jump in the middle pass's end.
    clock = {"t": 0.0, "reads": 0}

    def process_time():
        clock["reads"] += 1
        return clock["t"] + (10.0 if clock["reads"] == 4 else 0.0)

    def call(item):
        clock["t"] += 1.0

    monkeypatch.setattr(P.time, "process_time", process_time)
    # Passes of 3 items: 3 s, 13 s (the jump), then 3 s from a 10 s-later base: per item 1, 13/3, 1 -> median 1.
    assert P.cpu_seconds_per_item(call, [1, 2, 3], repeats=3) == pytest.approx(1.0)


def test_ray_stage_udf_rows_keep_their_order_and_columns(tiny_model):
    udf = RenderedPromptTokenizeUDF(data_column="__data", expected_input_keys=["prompt"], model=str(tiny_model))
    prompts = ["<start_of_turn>user\nDescribe this image.<end_of_turn>\n", "a b c", "x"]
    rows = P._run_async_udf(udf, [{"prompt": p, "keep": i} for i, p in enumerate(prompts)])
    assert [r["keep"] for r in rows] == [0, 1, 2]
    assert [r["tokenized_prompt"] for r in rows] == encode_rendered(udf.tokenizer, prompts)
    assert all(udf.IDX_IN_BATCH_COLUMN not in r for r in rows)


def test_table_names_the_cpu_every_stage_and_the_per_gpu_needs():
    results = {"W1": W1_LIKE, "W2": {**W1_LIKE, "PrepareRecords UDF": 0.06}}
    derived = {name: P.cores_per_gpu(costs, 27.2, 1.5) for name, costs in results.items()}
    text = P.format_table(results, derived, "Test CPU 9000")
    assert text.startswith("CPU: Test CPU 9000")
    for stage in P.STAGES:
        assert f"| {stage.name} |" in text
    assert "| PrepareRecords UDF | CPU pools | 8.00 | 60.00 |" in text
    assert "| preparation cores per GPU | 0.4 | 2.5 |" in text  # 10.0 and 62.0 ms x 27.2 x 1.5
    assert "| engine front-end, share of one core | 0.35 | 0.35 |" in text
