"""The one base class of every config model: unknown keys are errors, values are immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A typo in a hospital's config must fail loudly at start-up, never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
