"""DICOM over TLS, against real peers: DCMTK storescu/storescp with +tls, certificates made by
openssl for each test run (a CA, the node's certificate, a client's certificate)."""
from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from support.node_peers import DCMTK_ENV, NodeProcess, free_port, port_open, storescu, wait_until

CT = Path(get_testdata_file("CT_small.dcm"))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.crt, and node.{crt,key} / client.{crt,key} signed by it, valid for 127.0.0.1."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=dicom-node test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    (d / "leaf.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    for name in ("node", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "leaf.ext", cwd=d)
    return d


def _tls_storescu(pki: Path, port: int, files) -> subprocess.CompletedProcess:
    return storescu(files, port, extra=("+tls", str(pki / "client.key"), str(pki / "client.crt"), "-pw",
                                        "+cf", str(pki / "ca.crt")))


def _echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="PROBE")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENHANCE",
                         tls_args=None if context is None else (context, "127.0.0.1"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.Status == 0x0000


@pytest.mark.timeout(120)
def test_the_node_requires_tls_and_a_client_certificate_when_configured(tmp_path, pki, peers, constant_weights):
    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [{"name": "archive", "type": "folder", "path": str(outbox)}])
    node.config.write_text(node.config.read_text() + "\n".join([
        "[node.tls]", f"cert = {json.dumps(str(pki / 'node.crt'))}", f"key = {json.dumps(str(pki / 'node.key'))}",
        f"ca = {json.dumps(str(pki / 'ca.crt'))}", "require_client_cert = true", ""]))
    peers.append(node)
    node.start()

    secured = _tls_storescu(pki, node.port, [CT])  # DCMTK over TLS, with its client certificate
    assert secured.returncode == 0 and "Received Store Response (Success)" in secured.stderr, secured.stderr
    plain = storescu([CT], node.port)  # the same sender without TLS
    assert plain.returncode != 0 and "Success" not in plain.stderr

    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # TLS, trusts the node, but no client certificate
    anonymous.load_verify_locations(cafile=str(pki / "ca.crt"))
    assert _echo(node.port, anonymous) is False
    with_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with_cert.load_verify_locations(cafile=str(pki / "ca.crt"))
    with_cert.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    assert _echo(node.port, with_cert) is True
    assert _echo(node.port, None) is False
    import socket
    import time

    probe = socket.create_connection(("127.0.0.1", node.port))  # never starts a TLS handshake
    try:
        t0 = time.monotonic()
        assert _echo(node.port, with_cert) is True  # served meanwhile: the probe holds up nothing
        assert time.monotonic() - t0 < 4
    finally:
        probe.close()

    itself = node.cli("echo")  # `echo` of a TLS node: over TLS, with the node's certificate as ours
    assert itself.returncode == 0 and "C-ECHO success" in itself.stdout, itself.stdout + itself.stderr

    node.wait_drained(expected_done=1)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in outbox.rglob("*.dcm")] == [pydicom.dcmread(CT).SOPInstanceUID]
    assert node.proc.poll() is None


@pytest.mark.timeout(120)
def test_a_destination_over_tls_receives_from_the_node_with_its_client_certificate(tmp_path, pki, peers,
                                                                                 constant_weights):
    received = tmp_path / "pacs"
    received.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(received),
                             "+tls", str(pki / "node.key"), str(pki / "node.crt"), "-pw", "+cf", str(pki / "ca.crt"),
                             str(pacs_port)], env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open(pacs_port), 15, what="storescp +tls to listen")
        node = NodeProcess(tmp_path / "node", constant_weights,
                           [{"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}])
        node.config.write_text(node.config.read_text() + "\n".join([
            "[destinations.tls]", f"ca = {json.dumps(str(pki / 'ca.crt'))}",
            f"cert = {json.dumps(str(pki / 'client.crt'))}", f"key = {json.dumps(str(pki / 'client.key'))}", ""]))
        peers.append(node)
        node.start()

        echo = node.cli("echo", "pacs")
        assert echo.returncode == 0 and "C-ECHO success" in echo.stdout, echo.stdout + echo.stderr
        sent = storescu([CT], node.port)
        assert sent.returncode == 0, sent.stderr
        node.wait_drained(expected_done=1)
        arrived = wait_until(lambda: list(received.iterdir()), 15, what="the instance at the TLS PACS")
        assert [pydicom.dcmread(p).SOPInstanceUID for p in arrived] == [pydicom.dcmread(CT).SOPInstanceUID]
    finally:
        pacs.terminate()
        pacs.wait(10)


def test_tls_settings_are_validated_naming_the_key(tmp_path, pki):
    from dicom_node.config import load_config
    from dicom_node.errors import ConfigError

    base = "[[destinations]]\nname = \"a\"\ntype = \"folder\"\npath = \"out\"\n"
    config = tmp_path / "config.toml"
    config.write_text(base + f"[node.tls]\ncert = {json.dumps(str(pki / 'node.crt'))}\n")
    with pytest.raises(ConfigError, match=r"\[node.tls\] key is required"):
        load_config(config)
    config.write_text(base + f"[node.tls]\ncert = {json.dumps(str(pki / 'node.crt'))}\nkey = \"missing.key\"\n")
    with pytest.raises(ConfigError, match=r"\[node.tls\] key no file at .*missing.key"):
        load_config(config)
    config.write_text(base + "[node.tls]\n" + f"cert = {json.dumps(str(pki / 'node.crt'))}\n"
                      f"key = {json.dumps(str(pki / 'node.key'))}\nrequire_client_cert = true\n")
    with pytest.raises(ConfigError, match=r"\[node.tls\] ca is required with require_client_cert"):
        load_config(config)
    config.write_text(base + "[node.tls]\n" + f"cert = {json.dumps(str(pki / 'node.crt'))}\n"
                      f"key = {json.dumps(str(pki / 'node.key'))}\n")
    assert load_config(config).node.tls.cert == pki / "node.crt"
