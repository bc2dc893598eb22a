"""``duo-gateway demo``: start the simulated network, then run the scenario once or serve until stopped.

The entry point lives here, above both :mod:`duo_gateway.sim.network` (which builds the network) and
:mod:`duo_gateway.sim.scenario` (which checks it), so the scenario can import the network's
constants without the network importing the scenario back: the import graph stays one-way.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from duo_gateway.config.runtime import LoggingConfig
from duo_gateway.daemon import stop_on_signals
from duo_gateway.observability.logging import configure_logging
from duo_gateway.sim.config import default_network, load_network
from duo_gateway.sim.network import SimulatedNetwork
from duo_gateway.sim.scenario import make_demo_view, run_scenario


def write_ports_file(path: Path, endpoints: dict[str, Any]) -> None:
    """Written once everything listens, so a script that waits for the file can connect at once."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(endpoints, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # readers polling for the file never see half of it


async def run_demo(*, once: bool, ports_file: Path | None, base_port: int, sim_config: Path | None,
                   workdir: Path | None, log_level: str) -> int:
    """The exit code of the demo: with ``once``, 0 only when every scenario check passed."""
    configure_logging(LoggingConfig.model_validate({"level": log_level}))
    net = load_network(sim_config) if sim_config else default_network()
    own_workdir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="duo-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    network = SimulatedNetwork(net, root, base_port)
    stop = stop_on_signals()
    try:
        await network.start()
        if ports_file is not None:
            write_ports_file(ports_file, network.endpoints())
        if once:
            report = await run_scenario(network)
            print(report.render())
            return 0 if report.ok else 1
        print(json.dumps(network.endpoints(), indent=2))
        await _print_view(network)
        print("simulated network running; Ctrl-C to stop", flush=True)
        await stop.wait()
        return 0
    finally:
        await network.stop()
        if own_workdir:
            shutil.rmtree(root, ignore_errors=True)


async def _print_view(network: SimulatedNetwork) -> None:
    """A view of the consenting patient's first TLB and XCA study, and how to look at it: the
    integrator's first sight of the viewer step, without a timeline app of their own."""
    gw = network.gateway
    if gw is None or gw.views is None:
        return
    bsn = next(p for p in network.net.patients if p.consent == "all").bsn
    assert network.pki is not None
    # As the first TLB client (the requester's timeline app), over DUO's mTLS listener.
    connector = aiohttp.TCPConnector(ssl=network.tlb_clients[0].ssl_context(network.pki.ca_cert))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        made = await make_demo_view(gw.http_url, gw.config.timeline.path_prefix, bsn, http)
    if isinstance(made, str):
        print(f"no demo view: {made}")
        return
    root, chosen, _manifests = made
    client = network.tlb_clients[0]
    print(f"a view of {len(chosen)} studies (valid {gw.config.views.ttl_s:.0f} s), DICOMweb root:\n  {root}\n"
          "it answers the TLB client that made it, so a viewer reaches it through that client's "
          "certificate (the timeline app's backend);\nOHIF: a dicomweb data source with qidoRoot = "
          f"wadoRoot = that URL behind such a proxy, or try:\n  curl --cacert {network.pki.ca_cert} "
          f"--cert {client.tls.cert} --key {client.tls.key} -H 'Accept: application/dicom+json' "
          f"{root}/studies")
