"""Transfer syntaxes by what a gateway may do with them: the one home of that classification.

Why a class and not just a UID list: a relay may convert between syntaxes of the same pixel fidelity only.
Uncompressed and lossless-compressed data decode to the same pixels, so DUO may decompress the one into the
other when a destination declines the stored syntax. Lossy data was already altered once; decompressing it
into an uncompressed syntax would hide that (the syntax class is how a reader learns it), and recompressing
it would alter it again, so DUO does neither.
"""

from __future__ import annotations

from typing import Final, Literal

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

SyntaxClass = Literal["uncompressed", "lossless", "lossy"]

#: What every PACS stores and DUO can convert between without touching pixel data.
UNCOMPRESSED_LE: Final = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
#: Native (unencapsulated) encodings: the pixel data is as acquired.
UNCOMPRESSED: Final = frozenset({*UNCOMPRESSED_LE, str(ExplicitVRBigEndian),
                                 str(DeflatedExplicitVRLittleEndian)})
#: Encapsulated encodings that decode to exactly the acquired pixels.
LOSSLESS_COMPRESSED: Final = frozenset({
    str(JPEGLosslessSV1), str(JPEGLossless), str(JPEGLSLossless), str(JPEG2000Lossless),
    str(JPEG2000MCLossless), str(RLELossless),
    str(HTJ2KLossless), str(HTJ2KLosslessRPCL),
})


#: The lossless encodings DUO asks a source for, in this order: the ones PACS archives store most, and
#: compress best, first. Only those DUO can also decompress (JPEG 2000 Part 2 multi-component cannot be):
#: a destination that declines one then still gets the pixels, decompressed by DUO; a syntax DUO could not
#: decompress is better left to the source, which holds its codec, to decompress before sending.
LOSSLESS_PREFERRED: Final = (
    str(JPEG2000Lossless), str(JPEGLSLossless), str(JPEGLosslessSV1), str(JPEGLossless), str(RLELossless),
    str(HTJ2KLossless), str(HTJ2KLosslessRPCL),
)
#: The lossy encodings of still images DUO asks a source for: carried as stored, because decompressing
#: them would hide that they are lossy and recompressing would alter them again (see above). Only those
#: whose compressed stream travels inside the object, so the file can be handed on whole.
LOSSY_PREFERRED: Final = (
    str(JPEG2000), str(JPEGExtended12Bit), str(JPEGBaseline8Bit), str(JPEGLSNearLossless), str(HTJ2K),
)
#: Every syntax DUO asks a source for (RAD-75 TransferSyntaxUIDList, C-GET storage contexts), best first:
#: what a source stores losslessly comes as stored; then uncompressed little endian, which every source can
#: produce; lossy syntaxes last. Uncompressed before lossy because a source that answers with the first
#: listed syntax it can produce, and has a lossy encoder but no lossless one, would otherwise lossy-compress
#: an uncompressed original: pixels lost for good. The other risk of this order is benign: a source that
#: decompresses a lossy original sends the same pixels, bigger, still flagged lossy (0028,2110). A source
#: choosing among accepted C-GET contexts (Orthanc, most PACS) sends what it stores either way.
#: Deflated is not asked for: DUO rewrites patient ids by splitting an instance's body, which a deflated
#: body does not allow (it is inflated in memory instead), and a source inflates it for free.
PREFERRED: Final = (*LOSSLESS_PREFERRED, *UNCOMPRESSED_LE, *LOSSY_PREFERRED)


def syntax_class(transfer_syntax_uid: str) -> SyntaxClass:
    """Unknown encapsulated syntaxes count as lossy: claiming unvouched fidelity is the worse error."""
    if transfer_syntax_uid in UNCOMPRESSED:
        return "uncompressed"
    if transfer_syntax_uid in LOSSLESS_COMPRESSED:
        return "lossless"
    return "lossy"


__all__ = ["LOSSLESS_COMPRESSED", "LOSSLESS_PREFERRED", "LOSSY_PREFERRED", "PREFERRED", "UNCOMPRESSED",
           "UNCOMPRESSED_LE", "SyntaxClass", "syntax_class"]
