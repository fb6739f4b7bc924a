"""Checkpoints: safe reading of .safetensors and torch.save files, and named mismatches on load."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dgate_cli.errors import DgateError, MissingFileError, WeightsError
from dgate_cli.models import cifar_resnet
from dgate_cli.models.backbone import build_backbone
from dgate_cli.models.weights import load_into, read_state_dict

UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Payload:
    """Unpickling this object calls _record_unpickling: proof that unpickling happened."""

    def __reduce__(self):
        return (_record_unpickling, ("payload",))


@pytest.fixture(scope="module")
def r20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    m = cifar_resnet(20)
    # non-default buffers, so a load that silently keeps the init values is caught
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_same(sd: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(sd) == list(ref) or set(sd) == set(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype, k
        assert torch.equal(sd[k], ref[k]), k


def _assert_one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        "safetensors",
        "plain",
        "state_dict_module_prefix",
        "model",
        "model_state_dict",
        "orig_mod_prefix",
        "legacy_format",
    ],
)
def test_round_trip_and_load(tmp_path: Path, r20_state, layout):
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(r20_state, str(path))
    else:
        path = tmp_path / "w.pt"
        obj: object = dict(r20_state)
        kwargs = {}
        if layout == "state_dict_module_prefix":
            obj = {"state_dict": {f"module.{k}": v for k, v in r20_state.items()}, "best_prec1": 91.7, "epoch": 3}
        elif layout == "model":
            obj = {"model": dict(r20_state), "optimizer": {"lr": 0.1}}
        elif layout == "model_state_dict":
            obj = {"model_state_dict": dict(r20_state), "epoch": 1}
        elif layout == "orig_mod_prefix":
            obj = {f"module._orig_mod.{k}": v for k, v in r20_state.items()}
        elif layout == "legacy_format":
            kwargs = {"_use_new_zipfile_serialization": False}
        torch.save(obj, path, **kwargs)
    sd = read_state_dict(path)
    _assert_same(sd, r20_state)

    bb = build_backbone("cifar_resnet20", weights=str(path))
    _assert_same(bb.module.state_dict(), r20_state)
    assert bb.weights is not None
    assert bb.weights.source == str(path)
    assert bb.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.weights.to_dict() == {"source": str(path), "sha256": bb.weights.sha256}
    assert not bb.module.training


def test_read_state_dict_accepts_pathlike_and_str(tmp_path: Path, r20_state):
    path = tmp_path / "w.th"
    torch.save(r20_state, path)
    _assert_same(read_state_dict(str(path)), read_state_dict(path))


def test_partial_prefix_is_kept(tmp_path: Path):
    sd = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    path = tmp_path / "p.pt"
    torch.save(sd, path)
    assert set(read_state_dict(path)) == {"module.a", "b"}


# -- refusals --------------------------------------------------------------------------------------


def test_pickled_object_is_refused_without_unpickling(tmp_path: Path, r20_state):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": r20_state, "extra": Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(WeightsError) as ei:
        read_state_dict(path)
    assert UNPICKLED == [], "the checkpoint was unpickled"
    msg = _assert_one_line(ei.value)
    assert str(path) in msg and "will not unpickle" in msg
    with pytest.raises(WeightsError):
        build_backbone("cifar_resnet20", weights=str(path))
    assert UNPICKLED == []
    # sanity check of the probe itself: a full unpickle does call it
    torch.load(path, weights_only=False)
    assert UNPICKLED == ["payload"]


def test_whole_pickled_model_is_refused(tmp_path: Path):
    path = tmp_path / "model.pt"
    torch.save(cifar_resnet(20), path)
    with pytest.raises(WeightsError) as ei:
        read_state_dict(path)
    _assert_one_line(ei.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path: Path, r20_state, suffix):
    path = tmp_path / f"full{suffix}"
    if suffix == ".safetensors":
        save_file(r20_state, str(path))
    else:
        torch.save(r20_state, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        bad = tmp_path / f"cut{cut}{suffix}"
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightsError) as ei:
            read_state_dict(bad)
        msg = _assert_one_line(ei.value)
        assert str(bad) in msg


def test_corrupt_safetensors(tmp_path: Path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"definitely not safetensors")
    with pytest.raises(WeightsError, match="not a readable safetensors file") as ei:
        read_state_dict(path)
    _assert_one_line(ei.value)


def test_corrupt_zip_checkpoint(tmp_path: Path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a readable torch checkpoint") as ei:
        read_state_dict(path)
    _assert_one_line(ei.value)


def test_text_file_as_checkpoint_is_a_weights_error(tmp_path: Path):
    path = tmp_path / "notes.pt"
    path.write_bytes(b"hello world")
    with pytest.raises(WeightsError):
        read_state_dict(path)


def test_checkpoint_without_state_dict(tmp_path: Path):
    for name, obj in {"epoch.pt": {"epoch": 3, "acc": 0.9}, "list.pt": [torch.zeros(2)], "empty.pt": {}}.items():
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(WeightsError, match="holds no state dict") as ei:
            read_state_dict(path)
        _assert_one_line(ei.value)


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(MissingFileError) as ei:
        read_state_dict(path)
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, DgateError)
    msg = _assert_one_line(ei.value)
    assert str(path) in msg
    with pytest.raises(FileNotFoundError):
        build_backbone("cifar_resnet20", weights=str(tmp_path / "nope.th"))
    with pytest.raises(MissingFileError):
        read_state_dict(tmp_path)  # a directory is not a weights file


# -- mismatches --------------------------------------------------------------------------------------


def test_other_depth_names_missing_keys(tmp_path: Path, r20_state):
    path = tmp_path / "r20.pt"
    torch.save(r20_state, path)
    with pytest.raises(WeightsError) as ei:
        build_backbone("cifar_resnet32", weights=str(path))
    msg = _assert_one_line(ei.value)
    assert "cifar_resnet32" in msg and str(path) in msg
    assert "missing 60:" in msg and "layer1.3.conv1.weight" in msg and "and 56 more" in msg
    assert "unexpected" not in msg and "--model-kwargs" in msg


def test_other_architecture_names_missing_unexpected_and_wrong_shapes(r20_state):
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as ei:
        load_into(model, r20_state, "torchvision:resnet18", "r20.pt")
    msg = _assert_one_line(ei.value)
    assert "r20.pt does not fit torchvision:resnet18" in msg
    assert "wrong shape: conv1.weight (16, 3, 3, 3) vs model (64, 3, 7, 7)" in msg
    assert "missing 37:" in msg and "layer2.0.downsample.0.weight" in msg
    assert "unexpected 38:" in msg and "layer1.2.conv1.weight" in msg
    # nothing is loaded when the checkpoint does not fit
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unexpected_keys_only(r20_state):
    model = cifar_resnet(20)
    sd = {**r20_state, "extra.weight": torch.zeros(3)}
    with pytest.raises(WeightsError, match=r"unexpected 1: extra\.weight") as ei:
        load_into(model, sd, "cifar_resnet20", "x.pt")
    assert "missing" not in str(ei.value)


def test_num_batches_tracked_may_be_absent(r20_state):
    model = cifar_resnet(20)
    sd = {k: v for k, v in r20_state.items() if not k.endswith("num_batches_tracked")}
    load_into(model, sd, "cifar_resnet20", "old.pt")
    _assert_same({k: v for k, v in model.state_dict().items() if k in sd}, sd)


def test_other_class_count_suggests_num_classes(tmp_path: Path):
    torch.manual_seed(0)
    path = tmp_path / "r18_10.safetensors"
    save_file(torchvision.models.resnet18(num_classes=10).state_dict(), str(path))
    with pytest.raises(WeightsError) as ei:
        build_backbone("resnet18", weights=str(path))
    msg = _assert_one_line(ei.value)
    assert "fc.weight (10, 512) vs model (1000, 512)" in msg
    assert "--model-kwargs" in msg and "num_classes" in msg
    assert """'{"num_classes": 10}'""" in msg
    # following the hint works
    bb = build_backbone("resnet18", weights=str(path), model_kwargs='{"num_classes": 10}')
    assert bb.module.fc.out_features == 10


def test_cifar_class_count_hint(r20_state):
    model = cifar_resnet(20, num_classes=100)
    with pytest.raises(WeightsError) as ei:
        load_into(model, r20_state, "cifar_resnet20", "r20.pt")
    msg = _assert_one_line(ei.value)
    assert "for 10 classes and the model has 100" in msg and """'{"num_classes": 10}'""" in msg


def test_weights_errors_are_value_errors():
    assert issubclass(WeightsError, ValueError) and issubclass(WeightsError, DgateError)
    assert issubclass(MissingFileError, FileNotFoundError)
