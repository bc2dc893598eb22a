"""IHE ATNA audit trail (ITI-20): DICOM audit messages, syslog framing, and the durable ``Auditor``."""

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import AuditMessage, Peer

__all__ = ["AuditMessage", "Auditor", "Peer"]
