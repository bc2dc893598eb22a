"""ssl.SSLContext factories from the per-endpoint TLS config: the only place contexts are built."""

from __future__ import annotations

import ssl

from duo_gateway.config.tls import ClientTls, ServerTls

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(cfg: ServerTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.minimum_version]
    ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file), password=cfg.key_password)
    if cfg.ca_file is not None:
        ctx.load_verify_locations(cafile=str(cfg.ca_file))
    ctx.verify_mode = {
        "none": ssl.CERT_NONE,
        "optional": ssl.CERT_OPTIONAL,
        "required": ssl.CERT_REQUIRED,
    }[cfg.client_auth]
    return ctx


def client_context(cfg: ClientTls | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cfg is None:
        return ctx
    ctx.minimum_version = _VERSIONS[cfg.minimum_version]
    if cfg.ca_file is not None:
        ctx.load_verify_locations(cafile=str(cfg.ca_file))
    if cfg.cert_file is not None and cfg.key_file is not None:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file), password=cfg.key_password)
    ctx.check_hostname = cfg.check_hostname
    return ctx
