"""``duo-gateway``: serve, check a config, print the config schema, run the simulated network."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from duo_gateway import __version__

if TYPE_CHECKING:
    from duo_gateway.config.loader import DuoConfig

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID_CONFIG = 2
DEFAULT_CONFIG = Path("/etc/duo/duo.toml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duo-gateway", description=__doc__)
    p.add_argument("--version", action="version", version=f"duo-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway daemon")
    serve.add_argument("--config", type=Path, required=True, help="TOML config file")

    check = sub.add_parser("check-config", help="validate a config file; exit 2 when invalid")
    check.add_argument("file", type=Path)

    hc = sub.add_parser("healthcheck", help="exit 0 when the local daemon answers /healthz (container probe)")
    hc.add_argument("--config", type=Path, required=True)
    hc.add_argument("--timeout", type=float, default=4.0)

    mitz = sub.add_parser("mitz", help="Mitz tools")
    mitz_sub = mitz.add_subparsers(dest="mitz_command", required=True)
    mc = mitz_sub.add_parser("check", help="ask one closed question and print the decision "
                                           "(exit 0: Mitz answered, 1: no usable answer, 2: bad input)")
    mc.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    mc.add_argument("--bsn", required=True)
    mc.add_argument("--holder-ura", required=True, help="data holder URA")
    mc.add_argument("--holder-type", help="data holder organisation type (default: from config, else V6)")
    mc.add_argument("--requester-ura", required=True)
    mc.add_argument("--requester-type", default="V6")
    mc.add_argument("--uzi", default="000095254",
                    help="responsible professional's UZI (default: the Mitz test UZI; use your own)")
    mc.add_argument("--role", default="01.039", help="RoleCodeNL of the professional (default 01.039)")
    mc.add_argument("--purpose", default="TREAT", choices=["TREAT", "COC"])
    mc.add_argument("--category", action="append", help="gegevenscategorie (default: from config)")
    mc.add_argument("--json", action="store_true", help="print the decision as JSON")

    sub.add_parser("config-schema", help="print the JSON Schema of the config file")

    demo = sub.add_parser("demo", help="start the simulated national network with DUO on loopback")
    demo.add_argument("--once", action="store_true",
                      help="run the demo scenario, print a summary, exit 0 on success")
    demo.add_argument("--ports-file", type=Path, help="write the endpoints as JSON once listening")
    demo.add_argument("--base-port", type=int, default=0,
                      help="first port to use (consecutive ports); default picks free ports")
    demo.add_argument("--sim-config", type=Path, help="TOML of the simulated network (default: built in)")
    demo.add_argument("--workdir", type=Path, help="where PACS storage and configs go (default: temp)")
    demo.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "config-schema":
        from duo_gateway.config.loader import render_json_schema

        sys.stdout.write(render_json_schema())
        return EXIT_OK
    if args.command == "mitz":
        return _mitz_check(args)
    if args.command == "healthcheck":
        return _healthcheck(args.config, args.timeout)
    if args.command == "serve":
        return _serve(args.config)
    if args.command == "demo":
        from duo_gateway.sim.demo import run_demo

        return asyncio.run(run_demo(once=args.once, ports_file=args.ports_file, base_port=args.base_port,
                                    sim_config=args.sim_config, workdir=args.workdir,
                                    log_level=args.log_level))
    raise AssertionError(args.command)


def _load(path: Path) -> DuoConfig | None:
    """The config, or None after printing every problem (callers exit with EXIT_INVALID_CONFIG)."""
    from duo_gateway.config.loader import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return None


def _check_config(path: Path) -> int:
    from duo_gateway.access import access_problems

    config = _load(path)
    if config is None:
        return EXIT_INVALID_CONFIG
    problems = access_problems(config)
    if problems:
        print(f"{path}: invalid configuration ({len(problems)} problem(s))", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    print(f"{path}: valid ({len(config.tlb_hospitals)} TLB hospital(s), "
          f"{len(config.xca_communities)} XCA communit(y/ies))")
    return EXIT_OK


def _healthcheck(path: Path, timeout: float) -> int:
    """Probe the ops listener when there is one, else the main listener (TLS unverified: liveness only)."""
    import ssl
    import urllib.request

    config = _load(path)
    if config is None:
        return EXIT_INVALID_CONFIG
    ops, http = config.listeners.ops, config.listeners.http
    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - mapping wildcard binds to loopback
    if ops is not None:
        url, ctx = f"http://{local.get(ops.host, ops.host)}:{ops.port}/healthz", None
    else:
        scheme = "https" if http.tls else "http"
        url = f"{scheme}://{local.get(http.host, http.host)}:{http.port}/healthz"
        ctx = ssl._create_unverified_context() if http.tls else None  # noqa: S323 - own process, liveness
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:  # noqa: S310 - config URL
            ok = resp.status == 200
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if ok else EXIT_FAILED


def _mitz_check(args: argparse.Namespace) -> int:
    """Hospital IT's connection test: one real closed question, the verdict and why."""
    import json

    from duo_gateway.audit.messages import Peer
    from duo_gateway.config.runtime import LoggingConfig
    from duo_gateway.mitz.client import MitzClient
    from duo_gateway.mitz.codec import MitzRequestError
    from duo_gateway.mitz.signing import request_signer
    from duo_gateway.mitz.xacml import ClosedQuestion
    from duo_gateway.observability.logging import configure_logging

    config = _load(args.config)
    if config is None:
        return EXIT_INVALID_CONFIG
    configure_logging(LoggingConfig(level="WARNING"), stream=sys.stderr)
    hospital = config.hospital_by_ura(args.holder_ura)
    try:
        question = ClosedQuestion(
            bsn=args.bsn, holder_ura=args.holder_ura,
            holder_type=args.holder_type or (hospital.organisation_type if hospital else "V6"),
            categories=tuple(args.category or config.mitz.categories),
            requester_uzi=args.uzi, requester_role=args.role, requester_ura=args.requester_ura,
            requester_type=args.requester_type, purpose=args.purpose)
    except MitzRequestError as exc:
        print(f"invalid question: {exc}", file=sys.stderr)
        return EXIT_INVALID_CONFIG

    async def ask() -> int:
        client = MitzClient(config.mitz, gateway=Peer(user_id=config.listeners.dicom.ae_title),
                            signer=request_signer(config.mitz))
        try:
            decision = await client.closed_question(question)
        finally:
            await client.close()
        if args.json:
            print(json.dumps({"permitted": decision.permitted, "decision": decision.summary,
                              "decisions": dict(zip(question.categories, decision.decisions, strict=True)),
                              "reason": decision.reason}))
        else:
            verdict = "PERMIT: disclosure allowed" if decision.permitted else "NO CONSENT: nothing disclosed"
            print(f"{verdict} (decision {decision.summary}, {config.mitz.closed_url})")
            if decision.reason:
                print(f"reason: {decision.reason}")
        return EXIT_FAILED if decision.source == "error" else EXIT_OK

    return asyncio.run(ask())


def _serve(path: Path) -> int:
    from duo_gateway.daemon import serve
    from duo_gateway.observability.logging import configure_logging

    config = _load(path)
    if config is None:
        return EXIT_INVALID_CONFIG
    configure_logging(config.logging)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    raise SystemExit(main())
