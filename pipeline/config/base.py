"""What every section shares: unknown keys are errors, and the pool-size type of the stages.
"""
from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict


Concurrency = Union[int, tuple[int, int]]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_concurrency(value: Concurrency, field: str) -> Concurrency:
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{field} must be >= 1, got {value}")
        return value
    low, high = value
    if not 1 <= low <= high:
        raise ValueError(f"{field} (min, max) needs 1 <= min <= max, got {value}")
    return (low, high)
