"""The simulated national network: who exists, what they hold, and how each peer misbehaves.

One model drives the demo, the tests and integrators' experiments, so a scenario (a slow hospital, a
Mitz that says Indeterminate) is a config change, never a code change.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from duo_gateway.bsn import is_valid_bsn
from duo_gateway.config.base import StrictModel
from duo_gateway.sim.behaviour import Misbehaviour, MitzMisbehaviour, XcaMisbehaviour

ConsentProfile = Literal["all", "partial", "none"]


class SimPatient(StrictModel):
    bsn: str
    #: DICOM person name, ``Family^Given``.
    name: str
    birth_date: str = Field(pattern=r"^\d{8}$")
    sex: Literal["M", "F", "O"]
    #: ``all``: consent for every data holder; ``partial``: only the first TLB hospital and the first
    #: institution of each community; ``none``: no consent anywhere.
    consent: ConsentProfile

    @field_validator("bsn")
    @classmethod
    def _bsn(cls, v: str) -> str:
        if not is_valid_bsn(v):
            raise ValueError("not a valid BSN (11-proef)")
        return v


class SimInstitution(StrictModel):
    ura: str = Field(pattern=r"^\d{8}$")
    name: str
    organisation_type: str = "V6"


class SimHospital(SimInstitution):
    """A TLB hospital: its PACS is a DICOM Q/R SCP."""

    ae_title: str = Field(pattern=r"^[ -~]{1,16}$")
    repository_unique_id: str
    studies_per_patient: int = Field(default=2, ge=0, le=50)
    behaviour: Misbehaviour = Misbehaviour()


class SimCommunity(StrictModel):
    """An XCA community: one responding gateway in front of several institutions."""

    home_community_id: str = Field(pattern=r"^urn:oid:[0-2](\.\d+)+$")
    name: str
    repository_unique_id: str
    institutions: list[SimInstitution] = Field(min_length=1)
    studies_per_patient: int = Field(default=1, ge=0, le=50)
    #: BSN -> studies the first institution holds of that patient beyond ``studies_per_patient``,
    #: listed by their KOS manifest entry alone (no report entries) and made from their headers, so a
    #: patient with thousands of entries costs milliseconds per hundred; a study's instances are only
    #: generated when it is retrieved.
    manifest_only_studies: dict[str, int] = Field(default_factory=dict)
    behaviour: XcaMisbehaviour = XcaMisbehaviour()

    @field_validator("manifest_only_studies")
    @classmethod
    def _manifest_only(cls, v: dict[str, int]) -> dict[str, int]:
        for bsn, count in v.items():
            if not is_valid_bsn(bsn):
                raise ValueError("manifest_only_studies: a key is not a valid BSN (11-proef)")
            if not 0 <= count <= 20_000:
                raise ValueError("manifest_only_studies: a count is outside 0..20000")
        return v


class SimMitz(StrictModel):
    behaviour: MitzMisbehaviour = MitzMisbehaviour()


class SimNetworkConfig(StrictModel):
    seed: int = 20261125
    #: With instances of this many pixel rows/columns; small keeps the demo fast.
    image_size: int = Field(default=64, ge=8, le=1024)
    patients: list[SimPatient] = Field(min_length=1)
    hospitals: list[SimHospital] = Field(min_length=1)
    communities: list[SimCommunity] = Field(default_factory=list)
    mitz: SimMitz = SimMitz()

    def consent_holders(self, patient: SimPatient) -> set[str]:
        """URAs of the data holders this patient consented to share imaging (GGC002) from."""
        if patient.consent == "none":
            return set()
        if patient.consent == "all":
            uras = {h.ura for h in self.hospitals}
            uras.update(i.ura for c in self.communities for i in c.institutions)
            return uras
        uras = {self.hospitals[0].ura}
        uras.update(c.institutions[0].ura for c in self.communities)
        return uras


def default_network() -> SimNetworkConfig:
    """The demo network: two TLB hospitals, two XCA communities, three patients."""
    return SimNetworkConfig(
        patients=[
            SimPatient(bsn="999911120", name="Jansen^Anna", birth_date="19700312", sex="F", consent="all"),
            SimPatient(bsn="900186021", name="de Vries^Bram", birth_date="19581102", sex="M",
                       consent="partial"),
            SimPatient(bsn="123456782", name="Bakker^Carla", birth_date="19851224", sex="F", consent="none"),
        ],
        hospitals=[
            SimHospital(ura="00010001", name="Ziekenhuis Amstelland", ae_title="AMSTEL_PACS",
                        repository_unique_id="2.16.528.1.1007.99.10001.1"),
            SimHospital(ura="00010002", name="Maasziekenhuis", ae_title="MAAS_PACS",
                        repository_unique_id="2.16.528.1.1007.99.10002.1"),
        ],
        communities=[
            SimCommunity(home_community_id="urn:oid:2.16.528.1.1007.99.20001", name="XDS Noord",
                         repository_unique_id="2.16.528.1.1007.99.20001.1",
                         institutions=[SimInstitution(ura="00020011", name="UMC Noord"),
                                       SimInstitution(ura="00020012", name="Martini Noord")]),
            SimCommunity(home_community_id="urn:oid:2.16.528.1.1007.99.20002", name="XDS Zuid",
                         repository_unique_id="2.16.528.1.1007.99.20002.1",
                         institutions=[SimInstitution(ura="00020021", name="Catharina Zuid")]),
        ],
    )


def load_network(path: Path) -> SimNetworkConfig:
    with path.open("rb") as fh:
        return SimNetworkConfig.model_validate(tomllib.load(fh))
