from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from duo_gateway.cli import main
from duo_gateway.config.loader import ConfigError, load_config, render_json_schema
from tests.support.pki import Pki

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "duo.example.toml"

MINIMAL = """
[gateway]
home_community_id = "urn:oid:2.16.528.1.1007.99.1"
ura = "00099001"
name = "DUO"

[mitz]
closed_url = "https://mitz.example/geslotenautorisatievraag/xacml3"
open_url = "https://mitz.example/openautorisatievraag"
subscriptions_url = "https://mitz.example/abonnementen/fhir/Subscription"

[[tlb_hospitals]]
ura = "00010001"
name = "Amstelland"
ae_title = "AMSTEL_PACS"
host = "127.0.0.1"
port = 11113
repository_unique_id = "2.16.528.1.1007.99.10001.1"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "duo.toml"
    path.write_text(text, encoding="utf-8")
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check-config", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_example_config_is_valid(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    # As shipped, the one thing it lacks is the XCA peer's pinned signing certificate, which is a file
    # every deployment brings: check-config names exactly that.
    code, out = check(EXAMPLE, capsys)
    assert code == 2 and out.count("\n  - ") == 1, out
    assert "clients.xca[0] (xds-noord): signing_certs" in out and "No such file" in out
    # Next to that file, the example is valid.
    copy = tmp_path / "duo.example.toml"
    copy.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "xua").mkdir()
    (tmp_path / "xua" / "xds-noord-signing.pem").write_bytes(pki.client.cert.read_bytes())
    code, out = check(copy, capsys)
    assert code == 0, out
    assert "valid" in out


def test_minimal_config_is_valid_and_fills_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), env={})
    assert cfg.mitz.timeout_s == 3.0
    assert cfg.mitz.cache_ttl_s == 0.0
    assert cfg.listeners.dicom.tcp_nodelay is True
    assert cfg.tlb_hospitals[0].bsn_attribute == "PatientID"


def test_bad_toml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(write(tmp_path, MINIMAL + "\n[broken\n"), capsys)
    assert code == 2
    assert "not valid TOML" in out


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(tmp_path / "nope.toml", capsys)
    assert code == 2
    assert "cannot read file" in out


def test_unknown_key_is_reported_with_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = MINIMAL.replace('port = 11113', 'port = 11113\naet_title = "TYPO"')
    text += '\n[listeners.http]\nprot = 8443\n'
    code, out = check(write(tmp_path, text), capsys)
    assert code == 2
    assert "tlb_hospitals[0].aet_title: unknown key" in out
    assert "listeners.http.prot: unknown key" in out


def test_every_problem_is_listed_with_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (MINIMAL.replace('port = 11113', 'port = "one hundred"')
            .replace('ura = "00099001"', 'ura = "99001"')
            .replace('home_community_id = "urn:oid:2.16.528.1.1007.99.1"', 'home_community_id = "2.16.1"'))
    code, out = check(write(tmp_path, text), capsys)
    assert code == 2
    assert "tlb_hospitals[0].port:" in out
    assert "gateway.ura:" in out
    assert "gateway.home_community_id:" in out
    assert "3 problem(s)" in out


def test_missing_required_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = MINIMAL.split("[mitz]")[0]
    code, out = check(write(tmp_path, text), capsys)
    assert code == 2
    assert "mitz: Field required" in out


def test_duplicate_hospitals_are_refused(tmp_path: Path) -> None:
    hospital = MINIMAL[MINIMAL.index("[[tlb_hospitals]]"):]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + hospital), env={})
    assert "duplicate tlb_hospitals ura: 00010001" in info.value.render()


def test_env_overrides_ports_and_secrets(tmp_path: Path) -> None:
    env = {"DUO__LISTENERS__HTTP__PORT": "9443", "DUO__TLB_HOSPITALS__0__PORT": "104",
           "DUO__LOGGING__PSEUDONYM_KEY": "s3cret", "UNRELATED": "x"}
    cfg = load_config(write(tmp_path, MINIMAL), env=env)
    assert cfg.listeners.http.port == 9443
    assert cfg.tlb_hospitals[0].port == 104
    assert cfg.logging.pseudonym_key is not None
    assert cfg.logging.pseudonym_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(cfg)


def test_env_override_of_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), env={"DUO__LISTENERS__HTTP__PROT": "1",
                                                   "DUO__TLB_HOSPITALS__5__PORT": "1"})
    rendered = info.value.render()
    assert "listeners.http.prot: unknown key" in rendered
    assert "DUO__TLB_HOSPITALS__5__PORT: no list item '5'" in rendered


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    text = MINIMAL + '\n[storage]\npath = "spool"\n[listeners.http.tls]\ncert_file = "tls/a.crt"\n' \
                     'key_file = "tls/a.key"\nclient_auth = "none"\n'
    cfg = load_config(write(tmp_path, text), env={})
    assert cfg.storage.path == tmp_path / "spool"
    assert cfg.listeners.http.tls is not None
    assert cfg.listeners.http.tls.cert_file == tmp_path / "tls" / "a.crt"


def test_mtls_without_ca_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + '\n[listeners.http.tls]\ncert_file = "a.crt"\nkey_file = "a.key"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert "ca_file is required" in info.value.render()


def test_mitz_cache_never_longer_than_60s(tmp_path: Path) -> None:
    text = MINIMAL.replace('subscriptions_url', 'cache_ttl_s = 61\nsubscriptions_url')
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert "mitz.cache_ttl_s" in info.value.render()


def test_committed_json_schema_is_fresh() -> None:
    committed = (REPO / "schemas" / "config.schema.json").read_text(encoding="utf-8")
    assert committed == render_json_schema(), "schemas/config.schema.json is stale: run `make schema`"


def test_console_script_exit_codes(tmp_path: Path) -> None:
    bad = write(tmp_path, "[gateway\n")
    proc = subprocess.run([sys.executable, "-m", "duo_gateway", "check-config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    good = write(tmp_path, MINIMAL)
    proc = subprocess.run([sys.executable, "-m", "duo_gateway", "check-config", str(good)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_retrieve_window_is_a_size_and_a_former_count_is_refused(tmp_path: Path) -> None:
    sized = load_config(write(tmp_path, MINIMAL + '\n[xca_responding]\nretrieve_window = "8MiB"\n'))
    assert sized.xca_responding.retrieve_window == 8 * 1024 * 1024
    assert load_config(write(tmp_path, MINIMAL)).xca_responding.retrieve_window == 64 * 1024 * 1024
    env = {"DUO__XCA_RESPONDING__RETRIEVE_WINDOW": "1GiB"}
    assert load_config(write(tmp_path, MINIMAL), env=env).xca_responding.retrieve_window == 1 << 30
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, MINIMAL + "\n[xca_responding]\nretrieve_window = 16\n"))
    rendered = refused.value.render()
    assert "retrieve_window" in rendered and "size in bytes" in rendered and "count of files" in rendered
