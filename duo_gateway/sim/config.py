"""The simulated national network: who exists, what they hold, and how each peer misbehaves.

One model drives the demo, the tests and integrators' experiments, so a scenario (a slow hospital, a
Mitz that says Indeterminate) is a config change, never a code change.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from duo_gateway.bsn import is_valid_bsn
from duo_gateway.config.base import StrictModel
from duo_gateway.sim.behaviour import MitzMisbehaviour, PacsMisbehaviour, XcaMisbehaviour
from duo_gateway.sim.codecs import ENCODABLE

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


class SimCompressedStudy(StrictModel):
    """One generated study its holder stores in another transfer syntax than Explicit VR Little Endian.

    Archives keep studies compressed as they arrived or as their storage rules say, so a network where
    every study is uncompressed hides every syntax negotiation a gateway gets wrong.
    """

    bsn: str
    #: Which of the patient's studies at the institution: its generation index (0 = the first).
    study: int = Field(default=0, ge=0)
    transfer_syntax: str
    #: In a community: the institution whose study it is (URA); its first institution when not given.
    institution: str | None = None

    @field_validator("transfer_syntax")
    @classmethod
    def _encodable(cls, v: str) -> str:
        if v not in ENCODABLE:
            raise ValueError(f"the simulators cannot encode {v}; one of {', '.join(sorted(ENCODABLE))}")
        return v


class SimHospital(SimInstitution):
    """A TLB hospital: its PACS is a DICOM Q/R SCP."""

    ae_title: str = Field(pattern=r"^[ -~]{1,16}$")
    repository_unique_id: str
    studies_per_patient: int = Field(default=2, ge=0, le=50)
    compressed: list[SimCompressedStudy] = Field(default_factory=list)
    behaviour: PacsMisbehaviour = PacsMisbehaviour()

    def encodings(self, bsn: str, institution: SimInstitution | None = None) -> dict[int, str]:
        """Study index -> transfer syntax of the patient's studies stored other than Explicit VR LE."""
        del institution  # a hospital is its own (only) institution
        return {c.study: c.transfer_syntax for c in self.compressed if c.bsn == bsn}


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

    @field_validator("manifest_only_studies")
    @classmethod
    def _manifest_only(cls, v: dict[str, int]) -> dict[str, int]:
        for bsn, count in v.items():
            if not is_valid_bsn(bsn):
                raise ValueError("manifest_only_studies: a key is not a valid BSN (11-proef)")
            if not 0 <= count <= 20_000:
                raise ValueError("manifest_only_studies: a count is outside 0..20000")
        return v

    compressed: list[SimCompressedStudy] = Field(default_factory=list)
    #: False: its archive hands instances out only as stored, with no codec to convert them (as the
    #: Imaging Document Source of NIST's rig/iig 5404a and 5424a cases), so an instance requested in no
    #: syntax it is stored in gets an XDSRepositoryError.
    converts: bool = True
    behaviour: XcaMisbehaviour = XcaMisbehaviour()

    def encodings(self, bsn: str, institution: SimInstitution | None = None) -> dict[int, str]:
        """Study index -> transfer syntax of the patient's studies at ``institution`` stored other than
        Explicit VR LE."""
        ura = (institution or self.institutions[0]).ura
        return {c.study: c.transfer_syntax for c in self.compressed
                if c.bsn == bsn and (c.institution or self.institutions[0].ura) == ura}


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

    @model_validator(mode="after")
    def _compressed_studies_exist(self) -> SimNetworkConfig:
        patients = {p.bsn for p in self.patients}
        holders: list[tuple[str, SimHospital | SimCommunity, set[str]]] = [
            (h.ura, h, {h.ura}) for h in self.hospitals]
        holders += [(c.home_community_id, c, {i.ura for i in c.institutions}) for c in self.communities]
        for name, holder, uras in holders:
            for c in holder.compressed:
                if c.bsn not in patients:
                    raise ValueError(f"{name}: a compressed study of a patient not in the network")
                if c.study >= holder.studies_per_patient:
                    raise ValueError(f"{name}: compressed study {c.study}, but studies_per_patient is "
                                     f"{holder.studies_per_patient}")
                if c.institution is not None and c.institution not in uras:
                    raise ValueError(f"{name}: compressed study at {c.institution}, which is not one of "
                                     "its institutions")
        return self

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
    """The demo network: two TLB hospitals, two XCA communities, three patients.

    The patient who consents everywhere has compressed studies: JPEG 2000 Lossless at the first
    hospital, JPEG-LS Lossless and RLE Lossless in the two communities (their first studies).
    """
    return SimNetworkConfig(
        patients=[
            SimPatient(bsn="999911120", name="Jansen^Anna", birth_date="19700312", sex="F", consent="all"),
            SimPatient(bsn="900186021", name="de Vries^Bram", birth_date="19581102", sex="M",
                       consent="partial"),
            SimPatient(bsn="123456782", name="Bakker^Carla", birth_date="19851224", sex="F", consent="none"),
        ],
        hospitals=[
            SimHospital(ura="00010001", name="Ziekenhuis Amstelland", ae_title="AMSTEL_PACS",
                        repository_unique_id="2.16.528.1.1007.99.10001.1",
                        compressed=[SimCompressedStudy(bsn="999911120", study=0,
                                                       transfer_syntax=str(JPEG2000Lossless))]),
            SimHospital(ura="00010002", name="Maasziekenhuis", ae_title="MAAS_PACS",
                        repository_unique_id="2.16.528.1.1007.99.10002.1"),
        ],
        communities=[
            SimCommunity(home_community_id="urn:oid:2.16.528.1.1007.99.20001", name="XDS Noord",
                         repository_unique_id="2.16.528.1.1007.99.20001.1",
                         institutions=[SimInstitution(ura="00020011", name="UMC Noord"),
                                       SimInstitution(ura="00020012", name="Martini Noord")],
                         compressed=[SimCompressedStudy(bsn="999911120", study=0,
                                                        transfer_syntax=str(JPEGLSLossless))]),
            SimCommunity(home_community_id="urn:oid:2.16.528.1.1007.99.20002", name="XDS Zuid",
                         repository_unique_id="2.16.528.1.1007.99.20002.1",
                         institutions=[SimInstitution(ura="00020021", name="Catharina Zuid")],
                         compressed=[SimCompressedStudy(bsn="999911120", study=0,
                                                        transfer_syntax=str(RLELossless))]),
        ],
    )


def load_network(path: Path) -> SimNetworkConfig:
    with path.open("rb") as fh:
        return SimNetworkConfig.model_validate(tomllib.load(fh))
