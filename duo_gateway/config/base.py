"""The one base class of every config model: unknown keys are errors, values are immutable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo


class StrictModel(BaseModel):
    """A typo in a hospital's config must fail loudly at start-up, never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _resolve_against_config_dir(value: Path, info: ValidationInfo) -> Path:
    """Relative paths mean "next to the config file", so a config works wherever it is started from."""
    base = (info.context or {}).get("base_dir")
    if value.is_absolute() or base is None:
        return value
    return Path(base) / value


#: A filesystem path in the config; relative paths resolve against the config file's directory.
ConfigPath = Annotated[Path, AfterValidator(_resolve_against_config_dir)]

#: An IHE home community id, always in its strict ``urn:oid:`` form in our own config.
HomeCommunityId = Annotated[str, Field(pattern=r"^urn:oid:[0-2](\.(0|[1-9]\d*))+$", max_length=72)]

#: A URA (UZI-register abonneenummer): eight digits, leading zeros kept.
Ura = Annotated[str, Field(pattern=r"^\d{8}$")]

#: A DICOM application entity title: 1-16 printable ASCII characters, no backslash.
AeTitle = Annotated[str, Field(pattern=r"^[ -\[\]-~]{1,16}$")]

#: An ISO OID without the urn:oid: prefix (repositoryUniqueId and friends).
Oid = Annotated[str, Field(pattern=r"^[0-2](\.(0|[1-9]\d*))+$", max_length=64)]
