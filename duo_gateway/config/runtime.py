"""Process-level settings: storage, logging and shutdown."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from duo_gateway.config.base import ConfigPath, StrictModel


class StorageConfig(StrictModel):
    #: Spool, transfer jobs and the default audit file live here; a volume in the container.
    path: ConfigPath = Path("var")
    #: Database of transfer jobs. None is SQLite in ``transfers.sqlite`` under ``path`` (one DUO);
    #: ``postgresql://user@host/db`` lets several DUO replicas share jobs. Put a password in the
    #: environment (``DUO__STORAGE__URL``), not in the file.
    url: SecretStr | None = Field(default=None)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
                ("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("storage.url must start with postgresql://, postgres:// or sqlite:///")
        return value


class LoggingConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: ``json`` for operations; ``console`` is for a developer's terminal.
    format: Literal["json", "console"] = "json"
    #: Key of the keyed hash that replaces BSNs in operational logs. Without it a per-process random
    #: key is used, so pseudonyms cannot be correlated across restarts. Set it via the environment.
    pseudonym_key: SecretStr | None = None
    #: pynetdicom is chatty; its records pass the same PHI filter but default to warnings only.
    dicom_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


class DaemonConfig(StrictModel):
    #: On SIGTERM/SIGINT: stop accepting, then give in-flight requests this long to finish.
    shutdown_grace_s: float = Field(default=20.0, ge=0, le=600)
    #: Deadline of each dependency probe behind /readyz.
    readiness_timeout_s: float = Field(default=2.0, gt=0, le=30)
