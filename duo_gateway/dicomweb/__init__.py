"""Pure DICOMweb (PS3.18) codecs: the DICOM JSON model, QIDO-RS queries, multipart/related and Accept,
frames and rendered images.

Why a package of its own, with no I/O and no aiohttp: the HTTP routes and the data plane decide *what* to
send; these modules only say how PS3.18 spells it. Kept pure, every rule of the standard is testable on
values alone and against independent implementations (pydicom, dicomweb-client, the email parser),
and a route cannot leak its concerns (sockets, consent, logging of patient data) into the encoding.
The modules are imported directly (``duo_gateway.dicomweb.qido``), so importing one does not load all.
"""
