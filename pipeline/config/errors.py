"""The configuration's one error type and how a validation error is told to a user: one line per field, with what
is allowed and what was given.
"""
from __future__ import annotations

from typing import Any, Optional, Union, get_origin

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and what is allowed."""


def _describe(exc: ValidationError, source: str, root: type[BaseModel]) -> str:
    """One line per invalid field: its dotted name, what is wrong, what is allowed, and what was given.

    Errors from the members of a union (`engine_replicas`: int or [min, max]) are folded into one line
    that lists the accepted forms, rather than one cryptic line per member.
    """
    messages: dict[str, str] = {}
    union_forms: dict[str, list[str]] = {}
    for err in exc.errors():
        loc, member = _split_union_member(err["loc"], root)
        where = ".".join(str(p) for p in loc) or "(top level)"
        if member is not None:
            union_forms.setdefault(where, []).append(_UNION_FORMS.get(member, member))
            messages[where] = f"expected one of: {', '.join(union_forms[where])} (got {_shown(err.get('input'))})"
            continue
        message = err["msg"]
        section = _section_for(loc, root)
        if err["type"] == "extra_forbidden":
            message = "unknown field"
            parent = _section_for(loc[:-1], root)
            if parent is not None:
                message += f"; allowed: {', '.join(parent.model_fields)}"
        elif err["type"] in ("model_type", "dict_type") and section is not None and loc:
            message = (f"expected a section (mapping) with fields: {', '.join(section.model_fields)} "
                       f"(got {_shown(err.get('input'))})")
        elif err["type"] not in ("missing", "value_error") and "input" in err and not isinstance(err["input"], dict):
            message = f"{message} (got {_shown(err['input'])})"
        messages[where] = message if where not in messages else messages[where] + "; " + message
    return "\n".join([f"{source}: invalid configuration"] + [f"  {k}: {v}" for k, v in messages.items()])


# How the members of our union fields are named to a user (pydantic names them by type).
_UNION_FORMS = {"int": "an int (fixed pool)", "tuple[int, int]": "[min, max] (autoscaling pool)"}


def _split_union_member(loc: tuple, root: type[BaseModel]) -> tuple[tuple, Optional[str]]:
    """(field location, member) for an error inside one member of a union field, else (loc, None).

    Pydantic appends the member's type (`int`, `tuple[int, int]`) to the location of such errors.
    """
    model: type[BaseModel] = root
    for index, part in enumerate(loc):
        field = model.model_fields.get(str(part))
        if field is None:
            return loc, None  # an unknown field: reported as such
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        rest = loc[index + 1:]
        if rest and isinstance(rest[0], str) and get_origin(annotation) is Union:
            return loc[:index + 1], rest[0]
        return loc, None
    return loc, None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _section_for(loc: tuple, root: type[BaseModel]) -> Optional[type[BaseModel]]:
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model
