"""Gate features (pooling), stage costs (flops), image preprocessing and data specs / datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import write_image_folder
from PIL import Image
from torch import nn
from torchvision import transforms as T

from dgate_cli.data.datasets import DataSpec, FolderDataset, open_dataset, parse_data_spec
from dgate_cli.data.loader import iterate, make_loader
from dgate_cli.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, from_torchvision_weights
from dgate_cli.errors import DataError, DgateError, MissingFileError, SpecError
from dgate_cli.gates.pooling import Pooling, layout_of, pool
from dgate_cli.models.backbone import build_backbone
from dgate_cli.models.flops import StageCost, count_aten, count_thop, gate_macs, human, stage_costs
from dgate_cli.models.staging import StageGraph

# == features ==========================================================================================


def test_pooling_parse():
    assert Pooling.parse() == Pooling((1,), ("avg",))
    assert Pooling.parse("1,2", "avg+max") == Pooling((1, 2), ("avg", "max"))
    assert Pooling.parse("1+2+4", " max + avg ") == Pooling((1, 2, 4), ("max", "avg"))
    assert Pooling.parse(" 2 , 1 ,2") == Pooling((2, 1), ("avg",))  # order kept, duplicates dropped
    assert Pooling.parse(3) == Pooling((3,))
    assert Pooling.parse((1, 2), "max") == Pooling((1, 2), ("max",))
    assert Pooling.parse("1,2", "avg+avg").ops == ("avg",)
    p = Pooling.parse("1,2", "avg+max")
    assert str(p) == "avg+max@1,2"
    assert Pooling.from_dict(p.to_dict()) == p
    assert p.to_dict() == {"sizes": [1, 2], "ops": ["avg", "max"]}


@pytest.mark.parametrize(
    ("sizes", "ops", "match"),
    [
        ("a", "avg", "--pool"),
        ("1,x", "avg", "--pool"),
        ("0", "avg", "positive"),
        ("-1", "avg", "positive"),
        ("", "avg", "positive"),
        ("1", "mean", "avg, max"),
        ("1", "", "avg, max"),
        ("1", "avg+min", "avg, max"),
    ],
)
def test_pooling_parse_errors(sizes, ops, match):
    with pytest.raises(SpecError, match=match) as ei:
        Pooling.parse(sizes, ops)
    assert "\n" not in str(ei.value)


def test_feature_size():
    assert Pooling().feature_size(64) == 64
    assert Pooling.parse("1,2", "avg+max").feature_size(16) == 16 * 2 * 5 == 160
    assert Pooling.parse("4").feature_size(3) == 48


@pytest.mark.parametrize("sizes", ["1", "2", "1,2", "1,2,4"])
@pytest.mark.parametrize("ops", ["avg", "max", "avg+max", "max+avg"])
def test_pool_nchw_shape_and_values(sizes, ops):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    p = Pooling.parse(sizes, ops)
    f = pool(x, p, "nchw")
    assert f.shape == (2, p.feature_size(6))
    # concatenation order: ops outer, sizes inner, each block flattened channel-major
    expected, start = [], 0
    for op in p.ops:
        for s in p.sizes:
            y = F.adaptive_avg_pool2d(x, s) if op == "avg" else F.adaptive_max_pool2d(x, s)
            expected.append(y.flatten(1))
            assert torch.equal(f[:, start : start + 6 * s * s], y.flatten(1))
            start += 6 * s * s
    assert start == f.shape[1]
    assert torch.equal(f, torch.cat(expected, 1))


def test_pool_global_avg_max_values():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    f = pool(x, Pooling.parse("1", "avg+max"), "nchw")
    assert torch.equal(f[:, :3], x.mean((2, 3)))
    assert torch.equal(f[:, 3:], x.amax((2, 3)))


@pytest.mark.parametrize("sizes", ["1", "1,2"])
@pytest.mark.parametrize("ops", ["avg", "avg+max"])
def test_pool_nhwc_equals_nchw(sizes, ops):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 6)
    p = Pooling.parse(sizes, ops)
    assert torch.equal(pool(x.permute(0, 2, 3, 1), p, "nhwc"), pool(x, p, "nchw"))
    # NHWC-contiguous memory (what Swin produces) pools through channels-last kernels: same values up to
    # float rounding, not bit for bit
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    torch.testing.assert_close(pool(nhwc, p, "nhwc"), pool(x, p, "nchw"), rtol=1e-5, atol=1e-6)


def test_pool_tokens_with_class_token():
    torch.manual_seed(0)
    n, c, side = 2, 8, 3
    grid = torch.randn(n, c, side, side)
    cls = torch.randn(n, 1, c)
    tokens = torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1)  # (N, 1 + 9, C)
    assert layout_of(tokens) == "nlc"
    # global pooling averages every token, the class token included
    g = pool(tokens, Pooling(), "nlc")
    assert g.shape == (n, c) and torch.allclose(g, tokens.mean(1))
    assert torch.equal(pool(tokens, Pooling.parse("1", "max"), "nlc"), tokens.amax(1))
    # grid pooling drops the class token and uses the patch grid
    p = Pooling.parse("2", "avg+max")
    f = pool(tokens, p, "nlc")
    assert f.shape == (n, p.feature_size(c))
    assert torch.equal(f, pool(grid, p, "nchw"))


def test_pool_tokens_without_class_token():
    torch.manual_seed(0)
    grid = torch.randn(2, 4, 4, 4)
    tokens = grid.flatten(2).transpose(1, 2)  # (N, 16, C)
    assert torch.equal(pool(tokens, Pooling.parse("2"), "nlc"), pool(grid, Pooling.parse("2"), "nchw"))


def test_pool_tokens_without_square_grid():
    with pytest.raises(SpecError, match="--pool 1") as ei:
        pool(torch.zeros(2, 7, 4), Pooling.parse("2"), "nlc")
    assert "\n" not in str(ei.value)
    assert pool(torch.zeros(2, 7, 4), Pooling(), "nlc").shape == (2, 4)


def test_pool_nc_and_layouts():
    x = torch.randn(3, 10)
    assert layout_of(x) == "nc"
    assert torch.equal(pool(x, Pooling(), "nc"), x)
    assert layout_of(torch.zeros(1, 2, 3, 4)) == "nchw"
    assert layout_of(torch.zeros(1, 2, 3, 4), channels_last=True) == "nhwc"
    assert layout_of(torch.zeros(1, 2, 3)) == "nlc"
    assert layout_of(torch.zeros(1, 2, 3, 4, 5)) == "unsupported"
    assert layout_of(torch.zeros(4)) == "unsupported"


def test_pool_unsupported_layout():
    with pytest.raises(SpecError, match="layout unsupported"):
        pool(torch.zeros(1, 2, 3, 4, 5), Pooling(), "unsupported")


def test_pooled_features_do_not_alias_the_stage_output():
    x = torch.randn(3, 10)
    f = pool(x, Pooling(), "nc")
    before = f.clone()
    torch.relu_(x)  # what the next stage may do to its input
    assert torch.equal(f, before)


def test_pooling_macs():
    assert Pooling().macs((16, 8, 8)) == 16 * 64
    assert Pooling.parse("1,2", "avg+max").macs((16, 8, 8)) == 16 * 64 * 4


# == flops ==============================================================================================


def conv_linear_macs(module: nn.Module, x: torch.Tensor) -> int:
    """The oracle the counts are checked against, independent of thop and of torch's flop counter:
    MACs per sample of ``module``'s convolutions and linear layers on ``x``, from their shapes (each
    output element of a convolution costs in-channels / groups x kernel area, of a linear layer its
    in-features)."""
    total = 0

    def hook(m: nn.Module, args, out: torch.Tensor) -> None:
        nonlocal total
        per_sample = out.numel() // out.shape[0]
        if isinstance(m, nn.Conv2d):
            total += per_sample * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += per_sample * m.in_features

    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and not any(isinstance(m, nn.Conv2d) and m.dilation != (1, 1) for m in layers)
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return total


def test_resnet18_cost_matches_torchvision_meta():
    torch.manual_seed(0)
    g = StageGraph(torchvision.models.resnet18().eval(), "resnet18")
    stages = g.split(g.resolve(["layer2"]))
    costs = stage_costs(stages, torch.zeros(2, 3, 224, 224))
    assert len(costs) == 2
    published = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["_ops"]  # GMACs, as torchvision states
    assert round(sum(c.aten for c in costs) / 1e9, 3) == published
    x = torch.zeros(1, 3, 224, 224)
    for stage, c in zip(stages, costs, strict=True):
        assert isinstance(c, StageCost)
        assert c.aten == conv_linear_macs(stage, x)  # convolutions and products only: exactly the shapes' count
        assert c.thop >= c.aten  # thop counts the same layers and some elementwise work besides
        assert c.macs == max(c.thop, c.aten) > 0
        assert c.to_dict() == {"thop": c.thop, "aten": c.aten, "macs": c.macs}
        with torch.no_grad():
            x = stage(x)
    # stem + layer1 + layer2 costs more than layer3 + layer4 + head at 224 px
    assert costs[0].aten > costs[1].aten


def test_cifar_resnet56_stage_costs_sum_to_the_whole_model():
    torch.manual_seed(0)
    bb = build_backbone("cifar_resnet56")
    x = torch.zeros(1, 3, 32, 32)
    stages = bb.graph.split(bb.resolve_gates(["layer1", "layer2"]))
    costs = stage_costs(stages, x)
    assert len(costs) == 3
    assert sum(c.thop for c in costs) == count_thop(bb.module, x)
    assert sum(c.aten for c in costs) == count_aten(bb.module, x) == conv_linear_macs(bb.module, x)
    assert sum(c.macs for c in costs) >= conv_linear_macs(bb.module, x)
    # the three stages of a CIFAR ResNet cost about the same (each halves the grid and doubles the width)
    assert max(c.aten for c in costs) / min(c.aten for c in costs) < 1.1


def test_counts_are_per_sample():
    torch.manual_seed(0)
    bb = build_backbone("cifar_resnet20")
    one, four = torch.zeros(1, 3, 32, 32), torch.zeros(4, 3, 32, 32)
    assert count_aten(bb.module, one) == count_aten(bb.module, four)
    assert count_thop(bb.module, one) == count_thop(bb.module, four)
    # thop profiles a copy: the model keeps no thop buffers
    assert not any("total_ops" in k or "total_params" in k for k in bb.module.state_dict())


def test_gate_macs():
    assert gate_macs(1024, 64, 10) == 1024 + 640 + 10


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 "),
        (999, "999 "),
        (1000, "1 K"),
        (1500, "1.5 K"),
        (125.5e6, "125.5 M"),
        (4.09e9, "4.09 G"),
        (1_814_073_344, "1.814 G"),
        (-2e6, "-2 M"),
        (1e12, "1 T"),
    ],
)
def test_human(value, text):
    assert human(value) == text


# == preprocess =========================================================================================


def _random_pil(h: int, w: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_normalize_matches_torchvision_exactly():
    img = _random_pil(13, 17)
    p = Preprocess()
    ours = p.normalize(p.from_pil(img).unsqueeze(0))
    ref = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img).unsqueeze(0)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 13, 17)
    assert torch.equal(ours, ref)


def test_normalize_does_not_touch_the_uint8_batch():
    img = _random_pil(8, 8)
    p = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    u8 = p.from_pil(img).unsqueeze(0)
    keep = u8.clone()
    out = p.normalize(u8)
    assert torch.equal(u8, keep)
    assert torch.equal(out, (keep.float() / 255 - 0.5) / 0.25)
    assert p.normalize(u8, dtype=torch.float64).dtype == torch.float64


def test_torchvision_weights_preprocessing():
    w = torchvision.models.ResNet50_Weights.DEFAULT
    p = from_torchvision_weights(w)
    assert (p.resize, p.crop, p.interpolation) == (232, 224, "bilinear")
    assert p.mean == IMAGENET_MEAN and p.std == IMAGENET_STD
    assert p.input_size(fallback=32) == 224
    # the whole pipeline equals the weights' own transform on a PIL image
    img = _random_pil(300, 260, seed=1)
    ours = p.normalize(p.from_pil(img).unsqueeze(0))
    assert torch.equal(ours, w.transforms()(img).unsqueeze(0))
    v1 = from_torchvision_weights(torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    assert (v1.resize, v1.crop) == (256, 224)


def test_from_pil_resize_and_crop():
    img = _random_pil(40, 60)
    t = Preprocess(resize=20, crop=16).from_pil(img)
    assert t.dtype == torch.uint8 and t.shape == (3, 16, 16)
    assert Preprocess(resize=20).from_pil(img).shape == (3, 20, 30)
    assert Preprocess().from_pil(img.convert("L")).shape == (3, 40, 60)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"std": (0.2, -1.0, 0.2)}, "std"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"mean": (0.5,), "std": (0.2, 0.2)}, "one per channel"),
        ({"resize": 0}, "resize"),
        ({"crop": -3}, "crop"),
    ],
)
def test_preprocess_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocess(**kwargs)


def test_preprocess_dict_round_trip_and_override():
    p = Preprocess(resize=256, crop=224, interpolation="bicubic")
    assert Preprocess.from_dict(p.to_dict()) == p
    assert p.override(resize=0) == Preprocess(crop=224, interpolation="bicubic")
    assert p.override(crop=0, resize=None).crop is None and p.override(crop=0).resize == 256
    assert p.override(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)
    assert Preprocess().input_size(fallback=32) == 32 and Preprocess(resize=64).input_size(fallback=32) == 64


# == data ===============================================================================================


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """6 classes x 6 random 32x32 PNGs."""
    return write_image_folder(tmp_path / "imgs", [f"c{i}" for i in range(6)], 6)


def test_conftest_tiny_folder_can_be_built(tmp_path: Path):
    root = write_image_folder(tmp_path / "imgs", [f"c{i}" for i in range(10)], 6)  # what tiny_folder does
    assert len(open_dataset(str(root), Preprocess())) == 60


def test_parse_data_spec_forms():
    assert parse_data_spec("cifar10:/data:test") == DataSpec("cifar10", "/data", "test")
    assert parse_data_spec("cifar10:/data:train") == DataSpec("cifar10", "/data", "train")
    assert parse_data_spec("cifar10:C:/x:y:train") == DataSpec("cifar10", "C:/x:y", "train")
    assert parse_data_spec("images/val") == DataSpec("folder", "images/val")
    assert parse_data_spec(Path("images") / "val") == DataSpec("folder", os.path.join("images", "val"))
    assert str(parse_data_spec("cifar10:/data:test")) == "cifar10:/data:test"
    assert str(parse_data_spec("images/val")) == "images/val"


@pytest.mark.parametrize("bad", ["cifar10:/data:val", "cifar10::test", "cifar10:test", "cifar10:", "cifar10:/data"])
def test_parse_data_spec_errors(bad):
    with pytest.raises(DataError, match="cifar10:ROOT:train"):
        parse_data_spec(bad)


def test_folder_dataset(folder: Path):
    ds = open_dataset(str(folder), Preprocess())
    assert isinstance(ds, FolderDataset)
    assert len(ds) == 36
    assert ds.classes == [f"c{i}" for i in range(6)]
    assert ds.labels == sorted(ds.labels) == [c for c in range(6) for _ in range(6)]
    img, label, index = ds[7]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    assert (label, index) == (1, 7)
    assert ds.samples[7][0].endswith(os.path.join("c1", "0001.png"))


def test_folder_fingerprint(folder: Path):
    fp = open_dataset(str(folder), Preprocess()).fingerprint()
    assert len(fp) == 64
    # stable: same files, another dataset object, another preprocessing
    assert open_dataset(str(folder), Preprocess(resize=16)).fingerprint() == fp
    # a file's size changes
    victim = folder / "c3" / "0002.png"
    data, st = victim.read_bytes(), victim.stat()
    victim.write_bytes(data + b"\0")
    fp_size = open_dataset(str(folder), Preprocess()).fingerprint()
    assert fp_size != fp
    victim.write_bytes(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same bytes and modification time again
    assert open_dataset(str(folder), Preprocess()).fingerprint() == fp
    # a file is added
    (folder / "c3" / "0099.png").write_bytes(data)
    ds = open_dataset(str(folder), Preprocess())
    assert len(ds) == 37
    assert ds.fingerprint() not in (fp, fp_size)
    # a file that is not an image is ignored
    (folder / "c3" / "0099.png").unlink()
    (folder / "c3" / "notes.txt").write_text("hello")
    assert open_dataset(str(folder), Preprocess()).fingerprint() == fp


def test_folder_fingerprint_changes_when_a_file_moves_class(folder: Path):
    fp = open_dataset(str(folder), Preprocess()).fingerprint()
    (folder / "c0" / "0000.png").rename(folder / "c1" / "0100.png")
    (folder / "c1" / "0005.png").rename(folder / "c0" / "0000.png")
    assert open_dataset(str(folder), Preprocess()).fingerprint() != fp


def test_empty_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        open_dataset(str(tmp_path / "empty"), Preprocess())
    (tmp_path / "noimgs" / "a").mkdir(parents=True)
    (tmp_path / "noimgs" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images") as ei:
        open_dataset(str(tmp_path / "noimgs"), Preprocess())
    assert "\n" not in str(ei.value)


def test_missing_directory(tmp_path: Path):
    with pytest.raises(MissingFileError) as ei:
        open_dataset(str(tmp_path / "nope"), Preprocess())
    assert isinstance(ei.value, FileNotFoundError)
    assert str(tmp_path / "nope") in str(ei.value)
    with pytest.raises(MissingFileError, match="never downloads"):
        open_dataset(f"cifar10:{tmp_path / 'nope'}:test", Preprocess())


def test_loader_order_and_range(folder: Path):
    ds = open_dataset(str(folder), Preprocess())
    batches = list(iterate(make_loader(ds, 7, workers=0, start=5, stop=25)))
    idx = torch.cat([b[2] for b in batches])
    assert idx.tolist() == list(range(5, 25))
    assert torch.cat([b[1] for b in batches]).tolist() == ds.labels[5:25]
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape == (7, 3, 32, 32)
    assert torch.equal(batches[0][0][0], ds[5][0])
    with pytest.raises(DataError, match="batch size"):
        make_loader(ds, 0)


def _corrupt_folder(root: Path) -> Path:
    write_image_folder(root, ["a", "b"], 3)
    (root / "b" / "x.png").write_bytes(b"these bytes are not a PNG")
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_one_line_data_error(tmp_path: Path, workers: int):
    ds = open_dataset(str(_corrupt_folder(tmp_path / "imgs")), Preprocess())
    assert len(ds) == 7
    with pytest.raises(DataError) as ei:
        list(iterate(make_loader(ds, 4, workers=workers)))
    msg = str(ei.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert "x.png" in msg and "cannot read image" in msg and "Traceback" not in msg


def test_worker_error_message_equals_in_process_message(tmp_path: Path):
    ds = open_dataset(str(_corrupt_folder(tmp_path / "imgs")), Preprocess())
    msgs = []
    for workers in (0, 1):
        with pytest.raises(DataError) as ei:
            list(iterate(make_loader(ds, 4, workers=workers)))
        msgs.append(str(ei.value))
    assert msgs[1] == msgs[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_images_of_different_sizes_need_crop(tmp_path: Path, workers: int):
    write_image_folder(tmp_path / "mixed", ["a"], 2, size=32)
    write_image_folder(tmp_path / "mixed", ["b"], 2, size=40, seed=1)
    ds = open_dataset(str(tmp_path / "mixed"), Preprocess())
    with pytest.raises(DataError) as ei:
        list(iterate(make_loader(ds, 4, workers=workers)))
    msg = str(ei.value)
    assert "--crop" in msg and "\n" not in msg
    # with a crop every image has one size
    ds = open_dataset(str(tmp_path / "mixed"), Preprocess(resize=24, crop=24))
    ((images, labels, _),) = list(iterate(make_loader(ds, 4, workers=workers)))
    assert images.shape == (4, 3, 24, 24) and labels.tolist() == [0, 0, 1, 1]


def test_data_errors_are_dgate_value_errors():
    assert issubclass(DataError, ValueError) and issubclass(DataError, DgateError)
