import os

import pytest

from support.helpers import make_constant_checkpoint

os.environ.setdefault("TCP_NODELAY", "1")  # DCMTK tools stall ~40 ms per image without it


@pytest.fixture(scope="session")
def constant_weights(tmp_path_factory):
    """Checkpoint with the identity regional LUT (a=1, b=0) and window wc=0.5, ww=0.5."""
    return make_constant_checkpoint(tmp_path_factory.mktemp("weights") / "constant.pt")


@pytest.fixture
def peers():
    """Collects started nodes/Orthancs and stops them all at the end of the test."""
    started = []
    yield started
    for peer in reversed(started):
        peer.stop()
