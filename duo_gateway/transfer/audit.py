"""The audit trail of a transfer: what left a hospital for DUO, and what DUO handed to the requester.

XCA retrievals are audited where they happen (ITI-39 and RAD-75 Import records, in
:mod:`duo_gateway.xca.initiating.retriever`). What only the transfer knows is recorded here, one
record per study outcome:

- the **import from a TLB hospital** (DICOM Instances Transferred, DUO the destination that asked,
  by C-GET or C-MOVE), because that PACS's data reached DUO on this requester's behalf;
- the **disclosure to the destination** (DICOM Instances Transferred, DUO the source that pushed,
  by C-STORE), for every study, whichever world it came from: this is the moment the patient's images
  land in another organisation's PACS.

A failed study that stored nothing still gets its records, with a failure outcome, so an auditor sees
the attempt and why it ended (with how many instances did reach the destination).

Both records name the job's requester (professional, organisation, purpose; see
:class:`~duo_gateway.audit.messages.Requestor`): the systems alone (DUO, two PACSes) do not say on
whose behalf a patient's images moved.
"""

from __future__ import annotations

from datetime import UTC, datetime

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import (
    EventOutcome,
    Peer,
    Requestor,
    StudyTransfer,
    dicom_instances_transferred,
)
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.peers import TlbHospital
from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.transfer.jobstore import StudyState

_OUTCOME: dict[StudyState, EventOutcome] = {
    "completed": EventOutcome.SUCCESS, "partial": EventOutcome.MINOR_FAILURE,
}


def audit_study(auditor: Auditor, *, gateway: Peer, bsn: str, study_uid: str, state: StudyState, detail: str,
                destination: DestinationPacs, hospital: TlbHospital | None, stored: int,
                requestor: Requestor | None = None, stored_as: str | None = None) -> None:
    """Two records when a TLB hospital was the source (its PACS to DUO, DUO to the destination), one
    otherwise; ``stored_as`` is the ``local_patient_id`` the instances were relabelled to."""
    outcome = _OUTCOME.get(state, EventOutcome.SERIOUS_FAILURE)
    description = None if outcome == EventOutcome.SUCCESS else f"{state}: {detail}"[:1024]
    when = datetime.now(UTC)
    study = (StudyTransfer(study_uid),)
    if hospital is not None:
        pacs = Peer(user_id=hospital.ae_title, host=hospital.host)
        auditor.record(dicom_instances_transferred(
            side="destination", source=pacs, destination=gateway, requestor="destination",
            audit_source=auditor.audit_source, studies=study, patient_id=bsn_cx(bsn), outcome=outcome,
            outcome_description=description, when=when, on_behalf_of=requestor))
    requester_pacs = Peer(user_id=destination.ae_title, host=destination.host)
    auditor.record(dicom_instances_transferred(
        side="source", source=gateway, destination=requester_pacs, requestor="source",
        audit_source=auditor.audit_source, studies=study, patient_id=bsn_cx(bsn), outcome=outcome,
        outcome_description=f"{description}; {stored} instances stored" if description else None, when=when,
        on_behalf_of=requestor, stored_as=stored_as))


__all__ = ["audit_study"]
