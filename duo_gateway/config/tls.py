"""TLS material, configured per endpoint: each listener and each outbound peer has its own."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from duo_gateway.config.base import ConfigPath, StrictModel


class ServerTls(StrictModel):
    """TLS on a listener. ``client_auth = "required"`` is mTLS: a peer without a valid cert is refused."""

    cert_file: ConfigPath
    key_file: ConfigPath
    #: CA bundle that client certificates must chain to; needed unless client_auth is ``none``.
    ca_file: ConfigPath | None = None
    client_auth: Literal["none", "optional", "required"] = "required"
    #: Password of an encrypted key; set it through the environment, never in the file.
    key_password: str | None = None
    minimum_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _ca_for_client_auth(self) -> ServerTls:
        if self.client_auth != "none" and self.ca_file is None:
            raise ValueError("ca_file is required when client_auth is 'optional' or 'required'")
        return self


class ClientTls(StrictModel):
    """TLS towards a peer. ``cert_file``/``key_file`` present this gateway's certificate (mTLS)."""

    #: CA bundle the peer's server certificate must chain to; None uses the system store.
    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None
    key_password: str | None = None
    #: Hostname verification; only switch off for a peer addressed by IP whose cert lacks it.
    check_hostname: bool = True
    minimum_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _pair(self) -> ClientTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self
