"""How a simulated peer misbehaves on demand, shared by every simulator.

Tests, benchmarks and the demo flip these switches (in the sim config or at run time through the
simulators' admin endpoints) to prove that the gateway degrades correctly: slow peers time out, down
peers are reported unavailable, garbage is answered with a clear error, and consent fails closed.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import Field

from duo_gateway.config.base import StrictModel


class Misbehaviour(StrictModel):
    #: Added latency before every answer.
    delay_ms: int = Field(default=0, ge=0, le=600_000)
    #: Refuse connections (HTTP peers answer 503 and drop; DICOM peers stop listening).
    down: bool = False
    #: Answer with syntactically broken content instead of the real format.
    malformed: bool = False
    #: Answer with a SOAP Fault (SOAP peers only).
    fault: bool = False

    async def delay(self) -> None:
        if self.delay_ms:
            await asyncio.sleep(self.delay_ms / 1000)


MitzDecisionOverride = Literal["Permit", "Deny", "NotApplicable", "Indeterminate"]


class PacsMisbehaviour(Misbehaviour):
    #: A C-GET or C-MOVE sends this many instances, then aborts the association, as a PACS that
    #: crashes (or is restarted) mid-study does: what arrived is complete, the rest never comes.
    abort_after_instances: int | None = Field(default=None, ge=0)
    #: C-FIND answers leave out these (optional) attributes, as a PACS that does not compute them does:
    #: SOPClassesInStudy, say, which DUO's RAD-75 uses to skip walking a study to the image level.
    omit_keys: list[str] = Field(default_factory=list, max_length=100)


class XcaMisbehaviour(Misbehaviour):
    #: SOP Instance UIDs the imaging document source behind the gateway no longer holds (purged,
    #: lost): the KOS still lists them, but RAD-75 answers ``XDSDocumentUniqueIdError`` for each,
    #: beside the images it does have (PartialSuccess) or alone (Failure). This is how NIST's
    #: Responding Imaging Gateways play unknown UIDs and partial success (iig_2018-5404b, 5405a/b)
    #: to an Initiating Imaging Gateway whose RAD-75 requests follow the manifest.
    lost_instances: list[str] = Field(default_factory=list, max_length=100_000)
    #: ITI-39 answers a KOS manifest grown to at least this many bytes with references to instances
    #: that do not exist (0: the real manifest). The manifest hundreds of thousands of instances long
    #: that an Initiating Gateway must refuse at its limit instead of reading and parsing it.
    oversized_manifest_bytes: int = Field(default=0, ge=0, le=1024 * 1024 * 1024)


class MitzMisbehaviour(Misbehaviour):
    #: Answer every closed question with this decision whatever the consent records say.
    force_decision: MitzDecisionOverride | None = None
