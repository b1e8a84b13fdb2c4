"""The SCP's association socket: pynetdicom's `recv` contract, kept while reading faster."""
from __future__ import annotations

import socket
import threading

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from dicom_node.scp import PduSocket

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and 4 bytes


def received_by(socket_class: type[AssociationSocket]) -> list[bytearray]:
    """What `recv` returns for a PDU-like read pattern while the peer sends in small pieces,
    then closes before the last read is complete."""
    sender, receiver = socket.socketpair()
    wrapped = socket_class(Association(AE(), "acceptor"), client_socket=receiver)

    def send() -> None:
        for start in range(0, len(PAYLOAD), 1000):
            sender.sendall(PAYLOAD[start:start + 1000])
        sender.close()
    thread = threading.Thread(target=send)
    thread.start()
    try:
        return [wrapped.recv(6), wrapped.recv(len(PAYLOAD) - 10), wrapped.recv(10)]
    finally:
        thread.join(10)
        receiver.close()


@pytest.mark.timeout(30)
def test_the_pdu_socket_returns_what_pynetdicoms_socket_returns():
    ours = received_by(PduSocket)
    assert ours == received_by(AssociationSocket)
    assert [bytes(part) for part in ours] == [PAYLOAD[:6], PAYLOAD[6:-4], b"tail"]  # the last one short: closed
    assert all(type(part) is bytearray for part in ours)
