"""`dicom-node enhance` on files and folders, carrying on past bad files."""
import shutil
import subprocess
import sys

import pydicom
import pytest
from click.testing import CliRunner

from cli import main
from support.helpers import phantom_dataset, testdata


@pytest.fixture()
def inbox(tmp_path):
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(testdata("RG3_UNCR.dcm"), folder / "tibia.dcm")
    phantom_dataset(400, 300, modality="DX").save_as(folder / "nested" / "dx.dcm", enforce_file_format=True)
    (folder / "readme.txt").write_text("not an image")
    shutil.copy(testdata("SC_rgb.dcm"), folder / "colour.dcm")
    shutil.copy(testdata("emri_small.dcm"), folder / "nested" / "multiframe.dcm")
    data = testdata("RG1_UNCR.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 3])
    return folder


def test_enhance_does_the_good_files_and_reports_each_bad_one(inbox, tmp_path, constant_weights):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["enhance", str(inbox), "--out", str(out), "--weights", str(constant_weights), "--device", "cpu"])
    assert result.exit_code == 1
    written = sorted(out.glob("*.dcm"))
    assert len(written) == 2
    sources = {pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID for p in written}
    assert pydicom.dcmread(inbox / "tibia.dcm").SOPInstanceUID in sources
    for name, reason in [("readme.txt", "failed"), ("readme.txt", "not a DICOM file"), ("truncated.dcm", "failed"),
                         ("colour.dcm", "skipped"), ("colour.dcm", "is not enhanced"),
                         ("multiframe.dcm", "skipped"), ("multiframe.dcm", "MR (Enhanced MR Image Storage) is not enhanced")]:
        line = next(line for line in result.output.splitlines() if name in line)
        assert reason in line
    assert "2 enhanced, 2 skipped, 2 failed" in result.output


def test_any_modality_enhances_what_the_node_would_pass_through(inbox, tmp_path, constant_weights):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["enhance", str(inbox), "--out", str(out), "--weights", str(constant_weights),
                                       "--device", "cpu", "--any-modality"])
    for name, reason in [("colour.dcm", "RGB"), ("multiframe.dcm", "10 frames")]:
        line = next(line for line in result.output.splitlines() if name in line)
        assert line.startswith("failed") and reason in line
    assert "2 enhanced, 0 skipped, 4 failed" in result.output


def test_our_own_output_is_never_enhanced_again(tmp_path, constant_weights):
    first = CliRunner().invoke(main, ["enhance", str(testdata("RG3_UNCR.dcm")), "--out", str(tmp_path / "once"),
                                      "--weights", str(constant_weights), "--device", "cpu"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["enhance", str(tmp_path / "once"), "--out", str(tmp_path / "twice"),
                                      "--weights", str(constant_weights), "--device", "cpu"])
    assert "derived by dicom-node already" in again.output and "0 enhanced, 1 skipped" in again.output
    assert not list((tmp_path / "twice").glob("*.dcm"))


def test_enhance_all_good_exits_zero_in_burn_in_mode(tmp_path, constant_weights):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["enhance", str(testdata("RG3_UNCR.dcm")), "--out", str(out),
                                       "--weights", str(constant_weights), "--mode", "burn-in"])
    assert result.exit_code == 0, result.output
    (written,) = out.glob("*.dcm")
    assert pydicom.dcmread(written).VOILUTFunction == "LINEAR"


def test_a_corrupt_checkpoint_is_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    process = subprocess.run([sys.executable, "-m", "cli", "enhance", str(testdata("RG3_UNCR.dcm")),
                              "--out", str(tmp_path / "out"), "--weights", str(bad)], capture_output=True, text=True)
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().startswith("error: model weights") and "bad.pt" in process.stderr


def test_a_source_without_study_identity_is_reported_not_a_traceback(tmp_path, constant_weights):
    orphan = phantom_dataset(300, 240)
    del orphan.StudyInstanceUID
    orphan.save_as(tmp_path / "orphan.dcm", enforce_file_format=True)
    result = CliRunner().invoke(main, ["enhance", str(tmp_path / "orphan.dcm"), str(testdata("RG3_UNCR.dcm")),
                                       "--out", str(tmp_path / "out"), "--weights", str(constant_weights)])
    assert result.exit_code == 1
    assert "orphan.dcm: no StudyInstanceUID" in result.output.replace("failed ", "").replace(str(tmp_path) + "/", "")
    assert "1 enhanced, 0 skipped, 1 failed" in result.output
