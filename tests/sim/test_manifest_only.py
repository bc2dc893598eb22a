"""Manifest-only studies: a community simulator holding thousands of a patient's studies cheaply.

They must be indistinguishable from generated studies wherever they show: the header is the
generated study's, the KOS entry is the one the same study generated in full gets, and the KOS
retrieved (made on demand) is byte for byte the full study's.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from duo_gateway.sim.config import SimCommunity, default_network
from duo_gateway.sim.studies import generate_study, study_headers
from duo_gateway.sim.xca import XcaCommunitySimulator, community_seed
from duo_gateway.xca.metadata import KOS_FORMAT

NET = default_network()
PATIENT = NET.patients[0]
NOORD = NET.communities[0]


def test_a_header_is_the_generated_studys_header() -> None:
    institution = NOORD.institutions[0]
    for header in study_headers(PATIENT, institution, range(3, 9), NET.seed):
        study = generate_study(PATIENT, institution, header.index, NET.seed, image_size=8)
        assert (header.study_instance_uid, header.accession_number, header.study_id, header.study_date,
                header.study_time, header.modalities, header.description, header.body_part,
                header.patient_id, header.institution_ura, header.institution_name, header.series_count,
                header.instance_count) == (
            study.study_instance_uid, study.accession_number, study.study_id, study.study_date,
            study.study_time, study.modalities, study.description, study.body_part, study.patient_id,
            study.institution_ura, study.institution_name, len(study.series_instance_uids),
            len(study.instances))


def test_manifest_only_studies_are_the_generated_studies_kos_entries_and_manifests() -> None:
    """Studies 1 and 2 of the first institution, once generated and once manifest-only."""
    one = {"institutions": NOORD.institutions[:1]}
    full = NOORD.model_copy(update={**one, "studies_per_patient": 3})
    light = NOORD.model_copy(update={**one, "studies_per_patient": 1,
                                     "manifest_only_studies": {PATIENT.bsn: 2}})
    net_full = NET.model_copy(update={"communities": [full], "patients": [PATIENT]})
    net_light = NET.model_copy(update={"communities": [light], "patients": [PATIENT]})
    assert community_seed(net_full, full) == community_seed(net_light, light)
    generated = XcaCommunitySimulator(full, net_full)
    cheap = XcaCommunitySimulator(light, net_light)

    def kos(sim: XcaCommunitySimulator) -> dict[str, bytes]:
        return {d.entry.unique_id: d.data for d in sim.documents if d.entry.format_code == KOS_FORMAT}

    expected = {d.entry.entry_uuid: d.entry for d in generated.documents}
    manifest_only = [d for d in cheap.documents if not isinstance(d.content, bytes)]
    assert len(manifest_only) == 2
    assert all(expected[d.entry.entry_uuid] == d.entry for d in manifest_only)
    assert kos(cheap) == kos(generated)  # made on demand, byte for byte the same manifest
    # Reports of manifest-only studies are not listed: only the first (generated) study's report is.
    assert len([d for d in cheap.documents if d.entry.format_code != KOS_FORMAT]) == 1


@pytest.mark.parametrize("studies", [{"999911121": 3}, {PATIENT.bsn: -1}, {PATIENT.bsn: 20_001}])
def test_manifest_only_studies_refuse_bad_bsns_and_counts(studies: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match="manifest_only_studies"):
        SimCommunity.model_validate({**NOORD.model_dump(), "manifest_only_studies": studies})
