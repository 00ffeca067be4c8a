"""docs/configuration.md is generated from the config's field descriptions and must not go stale."""
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.config.reference import render

PAGE = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_the_reference_page_is_current():
    assert PAGE.read_text() == render(), (
        "docs/configuration.md is stale: run `python -m pipeline.config.reference > docs/configuration.md`")


def test_every_field_is_on_the_page_with_its_description():
    page = render()
    for section_name, section_field in PipelineConfig.model_fields.items():
        for name, field in section_field.annotation.model_fields.items():
            assert field.description, f"{section_name}.{name} has no description"
            assert f"| `{section_name}.{name}` |" in page
