"""Who this gateway is towards its peers."""

from __future__ import annotations

from pydantic import Field

from duo_gateway.config.base import HomeCommunityId, StrictModel, Ura


class GatewayIdentity(StrictModel):
    #: The XCA home community id under which DUO answers for the whole TLB community.
    home_community_id: HomeCommunityId
    #: DUO operator's URA: the requesting organisation when DUO asks on its own behalf.
    ura: Ura
    name: str = Field(min_length=1, max_length=200)
    #: Organisation type code (RoleCodeNL, 2.16.840.1.113883.2.4.15.1060), e.g. V6 hospital.
    organisation_type: str = Field(default="V6", pattern=r"^[A-Z0-9]{1,4}$")
