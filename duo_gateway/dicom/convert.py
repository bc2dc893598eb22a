"""The one rule for serving an instance in a syntax other than the one it is held in.

DUO converts only where nothing is lost: between the little-endian uncompressed syntaxes (pixel data
copied in chunks, dicom/transcode), and from a lossless compressed syntax to one of those (decoded in
the decoder helper process, dicom/decode_worker). Lossy data is never decompressed: that would hide
that it is lossy (dicom/syntaxes). RAD-75 answers and DICOMweb views both ask here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID

from duo_gateway.dicom.decode_worker import SharedDecodeWorker
from duo_gateway.dicom.syntaxes import UNCOMPRESSED_LE, syntax_class
from duo_gateway.dicom.transcode import TranscodeError, transcode_uncompressed


def convertible(stored: str, target: str) -> bool:
    """Whether an instance held in ``stored`` can be served in ``target`` without loss."""
    if target not in UNCOMPRESSED_LE:
        return False
    kind = syntax_class(stored)
    return kind == "lossless" or (kind == "uncompressed" and stored in UNCOMPRESSED_LE)


def convert_in_place(path: Path, accepted: Sequence[str], decoder: SharedDecodeWorker) -> str | None:
    """Re-encode ``path`` in place in the first requested uncompressed syntax; why not, or None when
    done. Blocking (the decoder is another process): call it from a worker thread."""
    current = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    target = next((ts for ts in accepted if ts in UNCOMPRESSED_LE), None)
    if target is None:
        return "no uncompressed syntax was requested"
    kind = syntax_class(current)
    if kind == "lossy":
        return "lossy data is not decompressed"
    if kind == "uncompressed" and current not in UNCOMPRESSED_LE:
        return "DUO converts only between little-endian uncompressed syntaxes"
    tmp = path.with_name(f".convert-{path.name}")
    try:
        if kind == "uncompressed":
            transcode_uncompressed(path, tmp, UID(target))
        else:
            decoder.decompress(path, tmp, target)
        tmp.replace(path)
    except TranscodeError as exc:
        return f"not decompressed: {exc.reason}"
    except (ValueError, struct.error) as exc:
        return f"not converted: {exc}"
    except OSError as exc:
        return f"not converted: {type(exc).__name__}"
    finally:
        tmp.unlink(missing_ok=True)
    return None
