"""Calibrating the prior to an archive in a house style other than the teacher's."""
from model.config import TeacherParams
from training.archive import Archive
from training.calibrate import calibrate, calibration_images, prior_mse, psnr_of
from training.styles import STYLES
from training.synth import synthesise


def test_calibration_moves_the_prior_to_a_known_in_family_style(tmp_path):
    archive = synthesise(tmp_path / "contrast", n=6, seed=3, perturbations=1, max_size=256, real=False,
                         style="contrast")
    items = Archive(archive, 8).items()
    truth = STYLES["contrast"].params
    fitted = calibrate(items, 8, TeacherParams(), images=6, max_evaluations=300)
    data = calibration_images(items, 8, images=6)
    # far better than the bundled prior, at least as good as the style's own parameters
    assert psnr_of(fitted.mse) > psnr_of(prior_mse(TeacherParams(), data, 8)) + 5
    assert psnr_of(fitted.mse) > psnr_of(prior_mse(truth, data, 8)) - 0.5
    # and towards them: a stronger detail gain (percentiles and squeeze trade off, so the window's
    # two numbers are not identifiable one by one)
    assert fitted.params.gain > TeacherParams().gain


def test_target_only_style_rows_carry_a_presentation_not_params(tmp_path):
    archive = synthesise(tmp_path / "vendor", n=3, seed=1, perturbations=1, max_size=128, real=False, style="vendor")
    rows = (archive / "manifest.csv").read_text().splitlines()[1:]
    assert rows and all(",target/" in r and r.split(",")[3] == "" for r in rows)
    items = Archive(archive, 8).items()
    assert not any(i.exact for i in items)
