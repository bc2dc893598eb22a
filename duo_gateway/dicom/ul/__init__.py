"""DUO's own DICOM Upper Layer (PS3.8) and DIMSE bulk path, on asyncio; named after the standard as
pynetdicom names its modules.

- :mod:`.pdu`: sans-I/O PDU codec (reader fed any chunking, encoders), PDVs as memoryviews;
- :mod:`.dimse`: DIMSE command sets by hand (group 0000, Implicit VR LE);
- :mod:`.part10`: the Part 10 file meta a received dataset is spooled with;
- :mod:`.association`: the asyncio association, requestor (:func:`~.association.connect`) and
  acceptor (:class:`~.association.UlServer`).

Why it exists and what it measured: docs/performance.md, "An asyncio DICOM data path". pynetdicom
keeps everything off the bulk path (C-FIND, C-ECHO SCU, C-MOVE-RQ, the simulated PACSes).
"""
