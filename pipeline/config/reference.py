"""The configuration reference page, generated from the typed config's field descriptions.

    python -m pipeline.config.reference > docs/configuration.md

The page is never edited by hand: tests/unit/config/test_config_reference.py fails when it differs from what
this module renders, so a field added, renamed or re-described in `pipeline/config/` shows up here.
"""
from __future__ import annotations

import json
import sys
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.config import PipelineConfig

HEADER = """# Configuration reference

Generated from `pipeline/config/` by `python -m pipeline.config.reference > docs/configuration.md`;
do not edit by hand. One typed configuration drives the batch job, the endpoint and the tools: a YAML
file (`--config`, e.g. `configs/gpu-fp8.yaml`) fills it, and `--set section.field=value` overrides any
field on the command line. Unknown keys are errors.
"""


def render() -> str:
    lines = [HEADER]
    for section_name, section_field in PipelineConfig.model_fields.items():
        section = section_field.annotation
        assert isinstance(section, type) and issubclass(section, BaseModel), section_name
        lines += [f"## `{section_name}`", ""]
        if section.__doc__ and section.__doc__.strip():
            lines += [" ".join(section.__doc__.split()), ""]
        lines += ["| field | type | default | what it does |", "|---|---|---|---|"]
        for name, field in section.model_fields.items():
            lines.append(f"| `{section_name}.{name}` | {_type(field.annotation)} | {_default(field)} | "
                         f"{_cell(field.description or '')} |")
        lines.append("")
    return "\n".join(lines)


def _type(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    if typing.get_origin(annotation) is typing.Literal:
        text = " / ".join(repr(a) for a in typing.get_args(annotation))
    return _cell(f"`{text}`")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return _cell(f"`{json.dumps(value, default=str)}`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
