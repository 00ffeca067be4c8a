"""Tool calling, batch and online: the tools offered and the parser.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.config.base import _Section


BuiltinTool = Literal["calculate", "lookup", "image_metadata"]


class TableSection(_Section):
    path: str = Field(description="A parquet or CSV file (by extension), local or s3://, read once per engine "
                      "replica: keep it small enough for memory.")
    key_column: str = Field(description="Column the `lookup` tool matches keys against (compared as text).")
    description: str = Field(default="", description="What the table holds, shown to the model.")


class ToolsSection(_Section):
    builtins: list[BuiltinTool] = Field(
        default_factory=list,
        description="Built-in tools offered to every record and run by the pipeline between rounds: "
        "'calculate' (exact arithmetic on fractions), 'lookup' (a row of a table in `tables`), "
        "'image_metadata' (size, format and EXIF of the record's original image). Empty: only records "
        "with a `tools` column get tools, and their calls are returned, not run.",
    )
    tables: dict[str, TableSection] = Field(
        default_factory=dict, description="Tables the `lookup` tool may read, by the name the model uses.")
    tool_choice: str = Field(
        default="auto",
        description="For records without a `tool_choice` value: 'auto' (the model decides), 'none', "
        "'required' (at least one call, forced by guided decoding) or a tool name (that call, forced). "
        "Forcing applies to the first round only; later rounds are 'auto'.",
    )
    max_rounds: int = Field(
        default=1, ge=1, le=16,
        description="Model turns per record. 1 returns the calls; N runs the pipeline's tools and lets the "
        "model continue, up to N turns. Each round is another prefill of the whole conversation (the "
        "prefix cache makes it cheap) and holds the record in the engine replica longer.",
    )
    tool_timeout_s: float = Field(default=10.0, gt=0, description="Longest one tool call may run; then the "
                                  "model gets an error result instead.")
    max_result_chars: int = Field(default=4000, ge=100, description="Tool results longer than this are cut "
                                  "before they go back to the model (they cost prompt tokens).")
    compact_json: bool = Field(
        default=True,
        description="Forced calls (guided JSON) without optional whitespace: fewer tokens per call, and no "
        "whitespace run until max_tokens, which a weak or random model can fall into. Sets vLLM's "
        "structured_outputs_config (xgrammar backend) for batch and online alike.",
    )
    chat_template: Optional[str] = Field(
        default=None,
        description="Jinja template for records with tools (and for the endpoint). None uses the packaged "
        "pipeline/templates/gemma3_tools.jinja, which renders records without tools exactly as Gemma 3's "
        "own template does.",
    )
    parser: str = Field(
        default="gemma3",
        description="vLLM tool parser name for the endpoint. 'gemma3' is this package's plugin "
        "(pipeline.engine.tool_parser), which reads the same calls as the batch job does.",
    )

    @model_validator(mode="after")
    def _tables_for_lookup(self) -> "ToolsSection":
        if "lookup" in self.builtins and not self.tables:
            raise ValueError("tools.builtins has 'lookup' but tools.tables is empty")
        if len(set(self.builtins)) != len(self.builtins):
            raise ValueError(f"tools.builtins lists a tool twice: {self.builtins}")
        return self
