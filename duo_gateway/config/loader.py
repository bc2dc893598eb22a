"""The root config model, loading from TOML, environment overrides, and human-readable problems.

One TOML file describes a deployment. Secrets and ports can be overridden from the environment as
``DUO__SECTION__KEY=value`` (``__`` separates path parts, list items are addressed by index:
``DUO__TLB_HOSPITALS__0__PORT=104``), so a container keeps key passwords out of mounted files. An
override naming a key that does not exist is an error, exactly like a typo in the file.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from duo_gateway.config.access import ClientsConfig
from duo_gateway.config.audit import AuditConfig
from duo_gateway.config.base import StrictModel
from duo_gateway.config.identity import GatewayIdentity
from duo_gateway.config.listeners import Listeners
from duo_gateway.config.mitz import MitzConfig
from duo_gateway.config.peers import TlbHospital, XcaCommunity
from duo_gateway.config.runtime import DaemonConfig, LoggingConfig, StorageConfig
from duo_gateway.config.timeline import TimelineConfig
from duo_gateway.config.transfer import TransferConfig
from duo_gateway.config.views import ViewsConfig
from duo_gateway.config.xca import XcaRespondingConfig
from duo_gateway.config.xua import XuaConfig

ENV_PREFIX = "DUO__"


class DuoConfig(StrictModel):
    gateway: GatewayIdentity
    listeners: Listeners = Listeners()
    #: The systems that may call DUO, and what each may do (duo_gateway.access).
    clients: ClientsConfig = ClientsConfig()
    tlb_hospitals: list[TlbHospital] = Field(default_factory=list)
    xca_communities: list[XcaCommunity] = Field(default_factory=list)
    mitz: MitzConfig
    xua: XuaConfig = XuaConfig()
    xca_responding: XcaRespondingConfig = XcaRespondingConfig()
    timeline: TimelineConfig = TimelineConfig()
    transfers: TransferConfig = TransferConfig()
    views: ViewsConfig = ViewsConfig()
    audit: AuditConfig = AuditConfig()
    storage: StorageConfig = StorageConfig()
    logging: LoggingConfig = LoggingConfig()
    daemon: DaemonConfig = DaemonConfig()

    @model_validator(mode="after")
    def _unique_peers(self) -> DuoConfig:
        """Duplicates would make routing ambiguous (which PACS is URA X?), so they are refused."""
        problems = []
        for label, values in (
            ("tlb_hospitals ura", [h.ura for h in self.tlb_hospitals]),
            ("tlb_hospitals ae_title", [h.ae_title for h in self.tlb_hospitals]),
            ("tlb_hospitals repository_unique_id", [h.repository_unique_id for h in self.tlb_hospitals]),
            ("xca_communities home_community_id", [c.home_community_id for c in self.xca_communities]),
        ):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                problems.append(f"duplicate {label}: {', '.join(dupes)}")
        if self.gateway.home_community_id in {c.home_community_id for c in self.xca_communities}:
            problems.append("gateway.home_community_id must differ from every xca_communities entry")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def hospital_by_ura(self, ura: str) -> TlbHospital | None:
        return next((h for h in self.tlb_hospitals if h.ura == ura), None)


@dataclass(frozen=True)
class ConfigProblem:
    """One problem, located by its key path so an operator can find it in the file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s)")
        self.source = source
        self.problems = problems

    def render(self) -> str:
        lines = [f"{self.source}: invalid configuration ({len(self.problems)} problem(s))"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not parts:
            continue
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(ConfigProblem(name, f"no list item {part!r} to override"))
                    break
                key: int | str = int(part)
            else:
                key = part
            if last:
                node[key] = _env_value(env[name])
            else:
                if isinstance(node, dict):
                    node = node.setdefault(key, {})
                else:
                    node = node[key]
    return problems


def _env_value(text: str) -> Any:
    """JSON where it parses (numbers, booleans, lists), else the plain string: ports and secrets both fit."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_config(raw: dict[str, Any], *, base_dir: Path | None, source: str,
                 env: Mapping[str, str] | None = None) -> DuoConfig:
    problems = _apply_env(raw, os.environ if env is None else env)
    try:
        config = DuoConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (typo?)"
            problems.append(ConfigProblem(_loc_to_path(tuple(err["loc"])), msg))
        raise ConfigError(source, problems) from None
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: Path, env: Mapping[str, str] | None = None) -> DuoConfig:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [ConfigProblem("", f"cannot read file: {exc.strerror}")]) from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [ConfigProblem("", f"not valid TOML: {exc}")]) from None
    return parse_config(raw, base_dir=path.resolve().parent, source=str(path), env=env)


def config_json_schema() -> dict[str, Any]:
    schema = DuoConfig.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "urn:duo-gateway:schema:config"
    schema["title"] = "duo-gateway configuration"
    return schema


def render_json_schema() -> str:
    return json.dumps(config_json_schema(), indent=2, sort_keys=True) + "\n"
