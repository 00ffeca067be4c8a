"""What the run report shows, as data: built by pipeline.report.build, rendered by pipeline.report.html.

A module of its own so the renderer needs only the data, not the code that reads the output to build it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunReport:
    """Everything the HTML shows: figures (name -> value), error examples, charts (name -> PNG)."""

    manifest: dict[str, Any]
    figures: dict[str, Any]
    cost: dict[str, Any]
    errors: list[dict[str, Any]]
    charts: dict[str, bytes] = field(default_factory=dict)
    # The gallery: sampled answered rows, and per error kind a few error rows (`gallery_entry` dicts).
    gallery: list[dict[str, Any]] = field(default_factory=list)
    gallery_errors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
