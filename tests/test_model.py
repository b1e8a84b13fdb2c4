"""The network's output constraints, geometry handling and checkpoints."""
import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.net import ModelConfig, build_model
from model.predictor import Predictor
from model.remap import downsample_image


@pytest.mark.parametrize("rows,cols,ds", [(1000, 1000, 8), (1003, 2501, 8), (4096, 1024, 16), (1200, 1000, 4),
                                          (4096, 200, 16), (64, 48, 16)])
def test_maps_keep_geometry_and_constraints_for_any_size_and_aspect(rows, cols, ds):
    torch.manual_seed(0)
    model = build_model(ModelConfig(downsample=ds, width=8)).eval()
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
    from tests.helpers import make_constant_checkpoint

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
