"""The spool's file writing: whatever is written reaches the kernel in pieces of at most
WRITE_PIECE bytes (one write() of 2 MiB or more is several times slower on ext4 with large
folios), and the bytes on disk are the bytes given."""
from __future__ import annotations

import io

import numpy as np
import pydicom

from dicom_node.spool import WRITE_PIECE, PieceWriter, write_atomic, write_file
from support.helpers import phantom_dataset


class _RecordingFile(io.FileIO):
    """A real file that remembers how many bytes each write() call was given."""

    sizes: list[int]

    def write(self, data) -> int:
        self.sizes.append(memoryview(data).nbytes)
        return super().write(data)


def test_a_large_write_reaches_the_file_in_pieces_with_its_bytes_unchanged(tmp_path):
    # 2 pieces and 6 bytes, given as an array of uint16 (any buffer, not only bytes)
    content = np.random.default_rng(3).integers(0, 65535, size=WRITE_PIECE + 3, dtype=np.uint16)
    with _RecordingFile(tmp_path / "out", "wb") as raw:
        raw.sizes = []
        assert PieceWriter(raw).write(content) == content.nbytes
        sizes = raw.sizes
    assert max(sizes) == WRITE_PIECE and sum(sizes) == content.nbytes and len(sizes) == 3
    assert (tmp_path / "out").read_bytes() == content.tobytes()


def test_written_files_are_the_bytes_given_directly_or_through_pydicom(tmp_path):
    ds = phantom_dataset(rows=1100, cols=1000, bits=12, seed=5)  # 2.2 MB of Pixel Data
    ds.save_as(tmp_path / "pydicom.dcm", enforce_file_format=True)
    expected = (tmp_path / "pydicom.dcm").read_bytes()

    write_file(tmp_path / "pieces.dcm", lambda f: ds.save_as(f, enforce_file_format=True))
    write_atomic(tmp_path / "atomic.dcm", expected)
    write_atomic(tmp_path / "atomic-callable.dcm", lambda f: f.write(memoryview(expected)))

    for name in ("pieces.dcm", "atomic.dcm", "atomic-callable.dcm"):
        assert (tmp_path / name).read_bytes() == expected, name
    assert np.array_equal(pydicom.dcmread(tmp_path / "pieces.dcm").pixel_array, ds.pixel_array)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "atomic-callable.dcm", "atomic.dcm", "pieces.dcm", "pydicom.dcm"]  # no temporary file left
