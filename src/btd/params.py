"""Helpers for parameters passed to notebooks by papermill (DVC cannot interpolate lists into a cmd)."""

from __future__ import annotations

from btd.errors import BTDConfigError


def parse_list(value: str | list | tuple, field: str, cast: type = str) -> list:
    """Turn 'a,b,c' (how params.yaml spells lists for papermill) into a typed list."""
    if isinstance(value, list | tuple):
        items = list(value)
    else:
        items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise BTDConfigError(field, "empty list")
    try:
        return [cast(v) for v in items]
    except (TypeError, ValueError):
        raise BTDConfigError(field, f"cannot read {value!r} as a list of {cast.__name__}") from None


def require_positive(value: float, field: str) -> float:
    """Sizes and counts must be > 0; say which field is wrong."""
    if not isinstance(value, int | float) or value <= 0:
        raise BTDConfigError(field, f"must be a positive number, got {value!r}")
    return value
