"""DICOM in: every common transfer syntax decodes, then design.md step 1 gives x in [0, 1]."""
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from dicom_node.errors import UnsupportedImage
from dicom_node.reader import decode_pixels, load_dataset, read_radiograph
from support.helpers import phantom_dataset, testdata

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
needs_dcmtk = pytest.mark.skipif(shutil.which("dcmcjpeg") is None and not os.environ.get("CI"), reason="DCMTK not installed (.ci/run installs it)")


def test_real_chest_cr_is_normalised_and_inverted_from_monochrome1():
    ds = load_dataset(testdata("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    x = read_radiograph(ds)
    stored = ds.pixel_array.astype(np.float64)
    assert x.dtype == np.float32 and x.shape == (1955, 1841)
    # MONOCHROME1: the smallest stored value is the brightest, scaled by the 15-bit depth.
    expected = 1.0 - stored / (2**15 - 1)
    assert np.abs(x - expected).max() < 1e-6


@pytest.mark.parametrize("uncompressed,compressed", [("RG1_UNCR.dcm", "RG1_J2KR.dcm"), ("RG3_UNCR.dcm", "RG3_J2KR.dcm")])
def test_jpeg2000_lossless_decodes_bit_identical_to_uncompressed(uncompressed, compressed):
    a = read_radiograph(load_dataset(testdata(uncompressed)))
    b = read_radiograph(load_dataset(testdata(compressed)))
    assert np.array_equal(a, b)


def test_modality_lut_rescale_is_applied_before_scaling():
    ds = phantom_dataset(200, 160, bits=12)
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-100"
    x = read_radiograph(ds)
    stored = ds.pixel_array.astype(np.float64)
    lo, hi = -100, 2 * 4095 - 100
    assert np.abs(x - (2 * stored - 100 - lo) / (hi - lo)).max() < 1e-6


@pytest.mark.parametrize("present", [{"RescaleSlope": "2"}, {"RescaleIntercept": "-100"}])
def test_a_lone_slope_or_intercept_is_ignored_as_pydicom_ignores_it(present):
    ds = phantom_dataset(200, 160, bits=12)
    plain = read_radiograph(ds)
    for keyword, value in present.items():
        setattr(ds, keyword, value)
    assert np.array_equal(read_radiograph(ds), plain)  # was: the missing one taken as 1 or 0, x out of range


def _convert(tool_args, src, dst):
    subprocess.run(tool_args + [str(src), str(dst)], check=True, env=DCMTK_ENV, capture_output=True)
    return dst


@needs_dcmtk
@pytest.mark.parametrize("name,tool,bits,lossless,syntax", [
    ("implicit", ["dcmconv", "+ti"], 12, True, "1.2.840.10008.1.2"),
    ("deflate", ["dcmconv", "+td"], 12, True, "1.2.840.10008.1.2.1.99"),
    ("jpeg-baseline", ["dcmcjpeg", "+eb"], 8, False, "1.2.840.10008.1.2.4.50"),
    ("jpeg-extended", ["dcmcjpeg", "+ee"], 12, False, "1.2.840.10008.1.2.4.51"),
    ("jpeg-lossless-p14", ["dcmcjpeg", "+el"], 12, True, "1.2.840.10008.1.2.4.57"),
    ("jpeg-lossless-sv1", ["dcmcjpeg", "+e1"], 16, True, "1.2.840.10008.1.2.4.70"),
    ("jpeg-ls", ["dcmcjpls", "+el"], 12, True, "1.2.840.10008.1.2.4.80"),
    ("rle", ["dcmcrle"], 12, True, "1.2.840.10008.1.2.5"),
])
def test_common_transfer_syntaxes_decode(tmp_path, name, tool, bits, lossless, syntax):
    source = phantom_dataset(240, 200, bits=bits, seed=3)
    src = tmp_path / "plain.dcm"
    source.save_as(src, enforce_file_format=True)
    converted = load_dataset(_convert(tool, src, tmp_path / f"{name}.dcm"))
    assert converted.file_meta.TransferSyntaxUID == syntax
    expected = read_radiograph(load_dataset(src))
    got = read_radiograph(converted)
    if lossless:
        assert np.array_equal(got, expected)
    else:  # lossy: our decode must agree with DCMTK's reference decoder (IDCTs differ by a few LSB)
        reference = read_radiograph(load_dataset(_convert(["dcmdjpeg"], tmp_path / f"{name}.dcm", tmp_path / "ref.dcm")))
        lsb = 1.0 / (2**bits - 1)
        assert np.abs(got - reference).max() <= 4 * lsb + 1e-6
        assert np.abs(got - reference).mean() <= 0.5 * lsb
        assert np.abs(got - expected).mean() < 0.2  # and still resemble the source


def test_jpeg2000_written_by_pydicom_decodes(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    ds = phantom_dataset(256, 200, bits=12)
    expected = read_radiograph(ds)
    ds.compress(JPEG2000Lossless)
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    assert np.array_equal(read_radiograph(load_dataset(tmp_path / "j2k.dcm")), expected)


def test_truncated_file_is_a_clear_error(tmp_path):
    data = testdata("RG3_UNCR.dcm").read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedImage, match="pixel data|unreadable"):
        read_radiograph(load_dataset(path))


def test_text_file_is_not_dicom(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    with pytest.raises(UnsupportedImage, match="not a DICOM file"):
        load_dataset(path)


def test_colour_image_is_refused():
    with pytest.raises(UnsupportedImage, match="RGB"):
        read_radiograph(load_dataset(testdata("SC_rgb.dcm")))


def test_multiframe_image_is_refused():
    with pytest.raises(UnsupportedImage, match="10 frames"):
        read_radiograph(load_dataset(testdata("emri_small.dcm")))


def test_dataset_without_pixels_is_refused():
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    with pytest.raises(UnsupportedImage, match="no Pixel Data"):
        read_radiograph(ds)


def test_unknown_transfer_syntax_is_a_clear_error(tmp_path):
    ds = phantom_dataset(64, 64)
    ds.save_as(tmp_path / "p.dcm", enforce_file_format=True)
    ds = load_dataset(tmp_path / "p.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"  # nobody's syntax
    with pytest.raises(UnsupportedImage):
        decode_pixels(ds)
