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
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
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


def syntax_class(transfer_syntax_uid: str) -> SyntaxClass:
    """Unknown encapsulated syntaxes count as lossy: claiming unvouched fidelity is the worse error."""
    if transfer_syntax_uid in UNCOMPRESSED:
        return "uncompressed"
    if transfer_syntax_uid in LOSSLESS_COMPRESSED:
        return "lossless"
    return "lossy"


__all__ = ["LOSSLESS_COMPRESSED", "UNCOMPRESSED", "UNCOMPRESSED_LE", "SyntaxClass", "syntax_class"]
