from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from duo_gateway.sim.config import SimNetworkConfig, default_network, load_network

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "sim.example.toml"


def test_example_sim_config_is_the_builtin_demo_network() -> None:
    assert load_network(EXAMPLE) == default_network()


def test_demo_patients_cover_every_consent_profile() -> None:
    net = default_network()
    assert {p.consent for p in net.patients} == {"all", "partial", "none"}
    by_profile = {p.consent: net.consent_holders(p) for p in net.patients}
    assert by_profile["none"] == set()
    assert by_profile["partial"] < by_profile["all"]
    assert net.hospitals[0].ura in by_profile["partial"]
    assert net.hospitals[1].ura not in by_profile["partial"]


def test_invalid_bsn_and_unknown_keys_are_refused() -> None:
    raw = default_network().model_dump()
    raw["patients"][0]["bsn"] = "123456789"
    with pytest.raises(ValidationError, match="11-proef"):
        SimNetworkConfig.model_validate(raw)
    raw = default_network().model_dump()
    raw["hospitals"][0]["behaviour"]["slow"] = True
    with pytest.raises(ValidationError, match="Extra inputs"):
        SimNetworkConfig.model_validate(raw)
