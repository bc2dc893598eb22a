"""Views: a remote study shown in the timeline app's viewer over DICOMweb before it is imported."""

from __future__ import annotations

from pydantic import ByteSize, Field

from duo_gateway.config.base import StrictModel

#: ``cache_bytes``' default: a few CT studies across all views at once.
CACHE_BYTES_DEFAULT = 2 * 1024 * 1024 * 1024


class ViewsConfig(StrictModel):
    enabled: bool = True
    #: How long a view's DICOMweb root stays usable after it was made. A view is for looking at a
    #: study now, before importing it; a later look asks Mitz again with a new view.
    ttl_s: float = Field(default=900.0, ge=10, le=24 * 3600)
    #: Where the DICOMweb roots are mounted: {dicomweb_path}/{capability}/studies/...
    dicomweb_path: str = Field(default="/dicomweb", pattern=r"^/[A-Za-z0-9/_.-]*[A-Za-z0-9_.-]$")
    #: Bytes of fetched instances all views together may keep on disk; the least recently used
    #: instances of views no one is reading go first, and come again from the source when asked.
    cache_bytes: ByteSize = Field(default=ByteSize(CACHE_BYTES_DEFAULT), ge=1024 * 1024)
    #: Most studies one view may hold, and most open views per TLB client.
    max_studies: int = Field(default=20, ge=1, le=200)
    max_views_per_client: int = Field(default=50, ge=1, le=10_000)
    #: Web origins of viewers that may call the DICOMweb routes from a browser (CORS), e.g.
    #: "https://tijdlijn.example.nl". Empty: no cross-origin access (a same-origin proxy still works).
    cors_origins: list[str] = Field(default_factory=list, max_length=100)
    #: How long a DICOMweb request waits for an instance that is still on its way from the source.
    instance_wait_s: float = Field(default=60.0, gt=0, le=600)
