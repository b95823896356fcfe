"""Project exceptions: one readable message naming the file or field, never a deep traceback."""

from __future__ import annotations

from pathlib import Path


class BTDError(Exception):
    """Base class for every error the project raises on purpose."""


class BTDInputError(BTDError, ValueError):
    """Bad input data (corrupt file, wrong shape, NaNs, coordinates outside the image)."""

    def __init__(self, source: str | Path, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class BTDConfigError(BTDError, ValueError):
    """Bad parameters (unknown scanner name, impossible split, wrong type)."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"params field '{field}': {problem}")
