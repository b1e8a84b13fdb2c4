"""The network's output constraints, geometry handling and checkpoints."""
import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.net import ModelConfig, build_model, mirror_averaged
from model.predictor import Predictor
from model.remap import downsample_image


@pytest.mark.parametrize("parameterisation", ["relative", "tissue", "prior"])
@pytest.mark.parametrize("rows,cols,ds", [(1000, 1000, 8), (1003, 2501, 8), (4096, 1024, 16), (1200, 1000, 4),
                                          (4096, 200, 16), (64, 48, 16)])
def test_maps_keep_geometry_and_constraints_for_any_size_and_aspect(rows, cols, ds, parameterisation):
    torch.manual_seed(0)
    model = build_model(ModelConfig(downsample=ds, width=8, parameterisation=parameterisation)).eval()
    x = torch.rand(1, 1, rows, cols)
    low = downsample_image(x, ds)
    with torch.no_grad():
        maps = model(low)
    assert maps.shape == (1, 4, -(-rows // ds), -(-cols // ds))
    a, b, wc, ww = maps[0]
    assert torch.all(a >= 0)
    assert torch.all((wc >= 0) & (wc <= 1))
    assert torch.all(ww >= model.config.min_ww)
    assert torch.isfinite(b).all()


def test_tissue_lowpass_is_a_normalised_convolution_that_ignores_what_is_outside_the_anatomy():
    model = build_model(ModelConfig(parameterisation="tissue", width=8))
    x = torch.full((1, 1, 120, 160), 0.3)
    x[..., :, 100:] = 0.9  # "collimation" on the right
    inside = torch.zeros_like(x)
    inside[..., :, :100] = 1.0
    low = model.tissue_lowpass(x, inside)
    assert torch.allclose(low[..., :, :95], torch.tensor(0.3), atol=1e-3)  # the plateau never leaks in
    plain = model.tissue_lowpass(x, torch.ones_like(x))
    assert plain[..., :, 90].mean() > 0.35  # without the mask it does
    assert torch.allclose(model.tissue_lowpass(torch.full_like(x, 0.5), inside), torch.tensor(0.5), atol=1e-4)


def test_mirror_averaging_is_mirror_equivariant_and_keeps_the_constraints():
    torch.manual_seed(1)
    model = build_model(ModelConfig(width=8, parameterisation="tissue")).eval()
    low = torch.rand(1, 1, 40, 56)
    with torch.no_grad():
        maps = mirror_averaged(model, low)
        mirrored = mirror_averaged(model, low.flip(-1))
        plain = model(low)
    assert torch.allclose(mirrored.flip(-1), maps, atol=1e-5)
    assert not torch.allclose(plain.flip(-1), model(low.flip(-1)), atol=1e-3)  # the network alone is not
    assert torch.all(maps[:, 0] >= 0) and torch.all(maps[:, 3] >= model.config.min_ww)


def test_config_rejects_invalid_values_with_the_argument_named():
    with pytest.raises(ValueError, match="downsample"):
        ModelConfig(downsample=3)
    with pytest.raises(ValueError, match="parameterisation"):
        ModelConfig(parameterisation="nonsense")


def test_checkpoint_rebuilds_its_own_model_and_identity(tmp_path):
    torch.manual_seed(1)
    model = build_model(ModelConfig(downsample=16, width=8, levels=4))
    identity = save_checkpoint(tmp_path / "m.pt", model, meta={"note": "round trip"})
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.identity == identity
    assert loaded.config == model.config
    assert loaded.meta["note"] == "round trip"
    x = torch.rand(1, 1, 64, 80)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.model(x))


def test_different_weights_have_different_identities(tmp_path):
    torch.manual_seed(1)
    first = save_checkpoint(tmp_path / "a.pt", build_model(ModelConfig(width=8)))
    torch.manual_seed(2)
    second = save_checkpoint(tmp_path / "b.pt", build_model(ModelConfig(width=8)))
    assert first != second


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model(ModelConfig(width=8)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.pt.*not a readable checkpoint"):
        load_checkpoint(path)


def test_foreign_and_missing_files_are_clear_errors(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not a dicom-node-checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_tampered_weights_fail_the_content_hash(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model(ModelConfig(width=8)))
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] += 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(path)


def test_mismatched_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model(ModelConfig(width=8)))
    payload = torch.load(path, weights_only=True)
    payload["config"]["width"] = 16
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="does not match its architecture"):
        load_checkpoint(path)


def test_predictor_with_constant_maps_computes_the_remap(tmp_path):
    from support.helpers import make_constant_checkpoint

    weights = make_constant_checkpoint(tmp_path / "c.pt", a=0.8, b=0.1, wc=0.4, ww=0.3)
    x = torch.rand(1030, 990).numpy()
    prediction = Predictor(weights, "cpu")(x)
    expected_y = torch.clamp(0.8 * torch.from_numpy(x) + 0.1, 0, 1)
    assert torch.allclose(prediction.y, expected_y, atol=1e-6)
    assert torch.allclose(prediction.z, torch.sigmoid(4 * (expected_y - 0.4) / 0.3), atol=1e-6)
    assert prediction.window == pytest.approx((0.4, 0.3))
    maps = prediction.full_maps()
    assert maps["a"].shape == x.shape
    assert abs(maps["ww"] - 0.3).max() < 1e-6


def test_device_choice_is_validated():
    with pytest.raises(ValueError, match="device"):
        Predictor("whatever.pt", device="tpu")


def test_the_tissue_model_is_invariant_to_a_global_gain_and_offset_of_the_acquisition():
    """Its y = a x + b is the same for x and alpha x + beta: the network sees the image only
    through its robust statistics, and a, b move with them (model/net.py)."""
    torch.manual_seed(2)
    model = build_model(ModelConfig(width=8, parameterisation="tissue")).eval()
    x = 0.2 + 0.5 * torch.rand(1, 1, 48, 64)
    with torch.no_grad():
        for alpha, beta in [(0.8, 0.05), (1.2, -0.1), (0.5, 0.3)]:
            xp = alpha * x + beta
            y, yp = [m[:, 0] * v[:, 0] + m[:, 1] for m, v in ((model(x), x), (model(xp), xp))]
            assert torch.allclose(y, yp, atol=1e-4), (alpha, beta)
    relative = build_model(ModelConfig(width=8, parameterisation="relative")).eval()
    with torch.no_grad():
        m, mp = relative(x), relative(0.8 * x + 0.05)
    assert not torch.allclose(m[:, 0] * x[:, 0] + m[:, 1], mp[:, 0] * (0.8 * x[:, 0] + 0.05) + mp[:, 1], atol=1e-3)


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG3_UNCR.dcm"])
def test_the_untrained_prior_model_is_the_teacher_on_its_input(name):
    """A zero correction (the prior parameterisation's start) reproduces the classical teacher run
    on the same image: what the model degrades to on anatomy it never saw."""
    import numpy as np

    from dicom_node.reader import load_dataset, read_radiograph
    from model.anatomy import find_anatomy_mask
    from model.remap import remap
    from model.teacher import teacher_on_input
    from support.helpers import testdata

    x = read_radiograph(load_dataset(testdata(name)))
    model = build_model(ModelConfig(parameterisation="prior", width=8)).eval()
    with torch.no_grad():
        maps = model(downsample_image(torch.from_numpy(x), 8))
        z = remap(torch.from_numpy(x), *maps.split(1, dim=1), downsample=8).z.numpy()
    expected = teacher_on_input(x).remap(x)[1]
    body = find_anatomy_mask(x)
    assert -10 * np.log10(np.mean((z - expected)[body] ** 2)) > 50


def test_prior_corrections_are_bounded_whatever_the_network_says():
    from model.teacher import TeacherParams

    torch.manual_seed(0)
    model = build_model(ModelConfig(parameterisation="prior", width=8)).eval()
    with torch.no_grad():
        model.head.bias.fill_(50.0)  # a network gone wild
        x = downsample_image(torch.rand(1, 1, 800, 640) * 0.5 + 0.25, 8)
        a, b, wc, ww = model(x)[0]
    g = TeacherParams().gain
    bound_a = ModelConfig().correction_bounds[0]
    assert torch.all(a <= g * torch.exp(torch.tensor(bound_a)) + 1e-5)
    assert torch.all((wc >= 0) & (wc <= 1)) and torch.isfinite(b).all() and torch.all(ww > 0)


def test_the_untrained_prior_model_shows_a_global_gain_and_offset_of_the_acquisition_alike():
    """The teacher's window follows a global gain/offset of the acquisition (y moves by the same
    affine map), so the displayed image does not change, apart from y's clip to [0, 1]."""
    import numpy as np

    from dicom_node.reader import load_dataset, read_radiograph
    from model.remap import remap
    from support.helpers import testdata

    x = read_radiograph(load_dataset(testdata("RG1_UNCR.dcm")))
    torch.manual_seed(3)
    model = build_model(ModelConfig(parameterisation="prior", width=8)).eval()
    shown = []
    for gain, offset in ((1.0, 0.0), (0.8, 0.1)):
        xp = torch.from_numpy(x * gain + offset)
        with torch.no_grad():
            maps = model(downsample_image(xp, 8))
        shown.append(remap(xp, *maps.split(1, dim=1), downsample=8).z.numpy())
    assert -10 * np.log10(np.mean((shown[0] - shown[1]) ** 2)) > 40


def test_a_prior_model_without_a_correction_skips_the_network_at_inference_with_the_same_maps():
    """The untrained (zero-head) prior model is exactly the teacher: inference does not run the
    network nor its mirrored pass; training still runs it (its gradients start the learning)."""
    torch.manual_seed(3)
    model = build_model(ModelConfig(parameterisation="prior", width=8, levels=3)).eval()
    low = torch.rand(1, 1, 48, 40) * 0.6 + 0.2
    assert not model.corrects()
    with torch.no_grad():
        fast = mirror_averaged(model, low)
        model.corrects = lambda: True  # as if the head could be non-zero: the network and its mirror run
        full = model(low)
    assert torch.equal(fast, full)
    del model.corrects
    model.train()  # still a zero head: training runs the network, or it could never start learning
    model(low)[:, 0].mean().backward()
    assert model.head.weight.grad is not None and bool(model.head.weight.grad.any())
