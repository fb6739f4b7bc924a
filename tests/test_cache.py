"""The feature cache: resumable, memory-bounded extraction; reuse, rebuild and mismatch rules."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO_GATES, R20_GATES
from PIL import Image
from safetensors.torch import save_file

from dgate_cli import _io, cache
from dgate_cli.errors import CacheMismatchError
from dgate_cli.gates.pooling import Pooling
from dgate_cli.pipeline import demo
from dgate_cli.pipeline.extract import extract

SHARD = 64
BATCH = 32
SIZES = {"train": 300, "val": 200}


TORCH_THREADS = 1  # tiny models and many small tensor ops (see conftest._threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)  # module fixtures run before the function-scoped thread setting
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(base: Path) -> dict[str, str]:
    return {k: str(v) for k, v in demo.write_dataset(base / "data", SIZES, seed=5).items()}


def _weights(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    save_file(demo.demo_cnn().state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def weights(base: Path) -> str:
    """Fixed weights: a random init would differ between calls and make caches incomparable."""
    return _weights(base / "w0.safetensors", 0)


def run_extract(run_dir: Path, data: dict[str, str], weights: str, **kw):
    kw = {"shard_size": SHARD, "batch_size": BATCH, "workers": 0, "device": "cpu", **kw}
    return extract(run_dir, kw.pop("model", "demo_cnn"), data, weights=weights, **kw)


@pytest.fixture(scope="module")
def clean(base: Path, data, weights):
    """One uninterrupted extraction, the reference for every other test (do not modify it)."""
    run = base / "clean"
    result = run_extract(run, data, weights)
    return run, result


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_mtimes(run: Path) -> dict[str, int]:
    return {p.relative_to(run).as_posix(): p.stat().st_mtime_ns for p in (run / "cache").rglob("shard-*.safetensors")}


def assert_same_cache(a: Path, b: Path, split: str) -> None:
    x, y = cache.load_split(a, split), cache.load_split(b, split)
    assert set(x.features) == set(y.features)
    for g in x.features:
        assert torch.equal(x.features[g], y.features[g]), g
    assert torch.equal(x.logits, y.logits)
    assert torch.equal(x.labels, y.labels)
    assert torch.equal(x.index, y.index)
    ia, ib = cache.read_index(a, split), cache.read_index(b, split)

    def entries(index):  # the files' bytes may differ in the sign of zeros (torch.equal: equal values)
        return [{k: v for k, v in s.items() if k != "sha256"} for s in index.shards]

    assert entries(ia) == entries(ib)
    assert all(len(s["sha256"]) == 64 for s in ia.shards + ib.shards)
    assert (ia.identity, ia.fingerprint, ia.num_samples, ia.complete) == (
        ib.identity,
        ib.fingerprint,
        ib.num_samples,
        ib.complete,
    )


# -- resuming ----------------------------------------------------------------------------------------


def test_interrupted_extraction_resumes_to_the_same_cache(tmp_path, clean, data, weights):
    run = tmp_path / "run"
    seen = []

    def interrupt(split: str, done: int, total: int) -> None:
        seen.append((split, done))
        if split == "train" and done >= 3 * BATCH:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(run, data, weights, progress=interrupt)
    assert ("val", 0) not in seen  # stopped in train
    index = cache.read_index(run, "train")
    assert index is not None and not index.complete
    # 96 samples were computed: one full shard of 64 is kept, the partial one is not
    assert [{k: v for k, v in s.items() if k != "sha256"} for s in index.shards] == [
        {"file": "shard-00000.safetensors", "start": 0, "count": SHARD}
    ]
    assert index.shards[0]["sha256"] == _io.sha256_file(cache.split_dir(run, "train") / "shard-00000.safetensors")
    d = cache.split_dir(run, "train")
    assert sorted(p.name for p in d.iterdir()) == ["index.json", "shard-00000.safetensors"]
    assert not list(run.rglob("*.incomplete"))
    assert cache.read_index(run, "val") is None
    with pytest.raises(Exception, match="incomplete"):
        cache.load_split(run, "train")

    result = run_extract(run, data, weights)
    assert result.splits["train"].resumed_from == SHARD
    assert result.splits["train"].reused is False
    assert result.splits["val"].resumed_from == 0
    assert any("resumed train" in n for n in result.notes), result.notes
    for split, n in SIZES.items():
        assert result.splits[split].images == n
        assert result.splits[split].backbone_accuracy == clean[1].splits[split].backbone_accuracy
        assert_same_cache(run, clean[0], split)
        sf = cache.load_split(run, split)
        assert torch.equal(sf.index, torch.arange(n))
    assert not list(run.rglob("*.incomplete"))


def test_interrupt_in_the_middle_of_val_keeps_train(tmp_path, clean, data, weights):
    run = tmp_path / "run"

    def interrupt(split: str, done: int, total: int) -> None:
        if split == "val" and done >= 5 * BATCH:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(run, data, weights, progress=interrupt)
    assert cache.read_index(run, "train").complete
    val = cache.read_index(run, "val")
    assert not val.complete and val.done == 2 * SHARD
    result = run_extract(run, data, weights)
    assert result.splits["train"].reused is True
    assert result.splits["val"].resumed_from == 2 * SHARD
    for split in SIZES:
        assert_same_cache(run, clean[0], split)


# -- reuse and rebuild -------------------------------------------------------------------------------


def test_finished_cache_is_reused_without_rewriting(tmp_path, clean, data, weights):
    run = copy_run(clean[0], tmp_path / "run")
    before = shard_mtimes(run)
    indexes = {s: (cache.split_dir(run, s) / "index.json").read_bytes() for s in SIZES}
    assert before
    result = run_extract(run, data, weights)
    for split, n in SIZES.items():
        s = result.splits[split]
        assert s.reused is True and s.resumed_from == 0 and s.images == n
        assert s.backbone_accuracy == clean[1].splits[split].backbone_accuracy
        assert (cache.split_dir(run, split) / "index.json").read_bytes() == indexes[split]
    assert shard_mtimes(run) == before


def test_changed_data_files_rebuild_only_that_split(tmp_path, clean, data, weights):
    run = copy_run(clean[0], tmp_path / "run")
    val = Path(shutil.copytree(data["val"], tmp_path / "val"))
    splits = {"train": data["train"], "val": str(val)}
    # the same files elsewhere: still the same cache
    same = run_extract(run, splits, weights)
    assert same.splits["val"].reused and same.splits["train"].reused
    train_mtimes = {k: v for k, v in shard_mtimes(run).items() if "/train/" in k}

    cls = sorted(p for p in val.iterdir() if p.is_dir())[0]
    Image.new("RGB", (32, 32), (200, 30, 30)).save(cls / "zz-extra.png")
    result = run_extract(run, splits, weights)
    assert result.splits["train"].reused is True
    assert result.splits["val"].reused is False
    assert result.splits["val"].resumed_from == 0
    assert result.splits["val"].images == SIZES["val"] + 1
    assert any("val" in n and "rebuild" in n for n in result.notes), result.notes
    assert not any("train" in n for n in result.notes), result.notes
    assert len(cache.load_split(run, "val")) == SIZES["val"] + 1
    assert {k: v for k, v in shard_mtimes(run).items() if "/train/" in k} == train_mtimes


@pytest.mark.parametrize(
    ("change", "sizes"),
    [({"gates": ["stage1"]}, None), ({"pooling": Pooling.parse("1", "avg")}, "global")],
    ids=["gates", "pool"],
)
def test_other_gates_or_pooling_rebuild_every_split(tmp_path, clean, data, weights, change, sizes):
    run = copy_run(clean[0], tmp_path / "run")
    (run / "gates.json").write_text("{}")  # stale products of the old cache must go
    (run / "calibration.json").write_text("{}")
    result = run_extract(run, data, weights, **change)
    for split in SIZES:
        assert result.splits[split].reused is False
        assert result.splits[split].resumed_from == 0
    what = "gates" if sizes is None else "pooling"
    assert any(f"extracted with other {what}: removed the cache of train, val, the fitted gates, the calibration" in n
               for n in result.notes), result.notes  # fmt: skip
    assert not (run / "gates.json").exists() and not (run / "calibration.json").exists()
    config = cache.read_run(run)
    old = clean[1].config
    if sizes is None:
        assert config.gates == ["stage1"] and config.feature_sizes == old.feature_sizes[:1]
    else:
        # the default (auto) pools every gate of this small CNN on a 4x4 grid: 16 times the global features
        assert config.gates == old.gates and config.feature_sizes == [d // 16 for d in old.feature_sizes]
    for split, n in SIZES.items():
        sf = cache.load_split(run, split)
        assert len(sf) == n
        for g, d in zip(config.gates, config.feature_sizes, strict=True):
            assert sf.features[g].shape == (n, d)
        assert torch.equal(sf.logits, cache.load_split(clean[0], split).logits)  # the backbone did not change


def test_another_model_or_weights_is_refused_unless_overwrite(tmp_path, clean, data, weights):
    run = copy_run(clean[0], tmp_path / "run")
    before = (run / "run.json").read_bytes()
    mtimes = shard_mtimes(run)
    other = _weights(tmp_path / "w1.safetensors", 1)
    with pytest.raises(CacheMismatchError, match="--overwrite") as info:
        run_extract(run, data, other)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CacheMismatchError, match="demo_cnn"):
        run_extract(run, data, None, model="cifar_resnet20")
    assert (run / "run.json").read_bytes() == before
    assert shard_mtimes(run) == mtimes

    result = run_extract(run, data, other, overwrite=True)
    assert all(not s.reused for s in result.splits.values())
    assert cache.read_run(run).weights["source"] == other
    assert not torch.equal(cache.load_split(run, "val").logits, cache.load_split(clean[0], "val").logits)
    result = run_extract(run, data, None, model="cifar_resnet20", overwrite=True)
    assert cache.read_run(run).model["spec"] == "cifar_resnet20"
    assert cache.read_run(run).gates == R20_GATES
    assert all(not s.reused for s in result.splits.values())


# -- layout ------------------------------------------------------------------------------------------


def test_load_split_shapes_and_bounded_shards(clean):
    run, result = clean
    config = json.loads((run / "run.json").read_text())
    assert config["gates"] == DEMO_GATES
    for split, n in SIZES.items():
        sf = cache.load_split(run, split)
        assert len(sf) == n
        assert set(sf.features) == set(config["gates"])
        for g, d in zip(config["gates"], config["feature_sizes"], strict=True):
            assert sf.features[g].shape == (n, d)
            assert sf.features[g].dtype == torch.float32
        assert sf.logits.shape == (n, len(config["classes"]))
        assert sf.labels.shape == (n,) and sf.labels.dtype == torch.long
        assert torch.equal(sf.index, torch.arange(n))
        assert sf.backbone_accuracy == result.splits[split].backbone_accuracy
        only = cache.load_split(run, split, gates=["stage2"])
        assert list(only.features) == ["stage2"]
        assert torch.equal(only.features["stage2"], sf.features["stage2"])

        index = cache.read_index(run, split)
        assert index.complete and index.shard_size == SHARD
        assert len(index.shards) == math.ceil(n / SHARD)
        counts = [s["count"] for s in index.shards]
        assert sum(counts) == n
        assert all(c == SHARD for c in counts[:-1]) and 0 < counts[-1] <= SHARD
        assert [s["start"] for s in index.shards] == [i * SHARD for i in range(len(counts))]
        files = sorted(p.name for p in cache.split_dir(run, split).glob("shard-*.safetensors"))
        assert files == [s["file"] for s in index.shards]


def test_load_split_of_an_unknown_gate(clean):
    with pytest.raises(CacheMismatchError, match="stage3"):
        cache.load_split(clean[0], "val", gates=["stage3"])


# -- run.json ----------------------------------------------------------------------------------------


def test_corrupt_run_json(tmp_path, clean, data, weights):
    run = copy_run(clean[0], tmp_path / "run")
    (run / "run.json").write_text('{"format_version": 1, "model": ')
    with pytest.raises(CacheMismatchError, match="corrupt") as info:
        cache.read_run(run)
    msg = str(info.value)
    assert "dgate extract" in msg and "--overwrite" in msg and "\n" not in msg
    with pytest.raises(CacheMismatchError):
        run_extract(run, data, weights)
    result = run_extract(run, data, weights, overwrite=True)
    assert cache.read_run(run).gates == DEMO_GATES
    assert all(s.images == SIZES[k] for k, s in result.splits.items())


def test_format_version_mismatch(tmp_path, clean):
    run = copy_run(clean[0], tmp_path / "run")
    d = json.loads((run / "run.json").read_text())
    d["format_version"] = 999
    (run / "run.json").write_text(json.dumps(d))
    with pytest.raises(CacheMismatchError, match="999") as info:
        cache.read_run(run)
    assert "dgate extract" in str(info.value) and "--overwrite" in str(info.value)
    with pytest.raises(CacheMismatchError):
        cache.load_split(run, "val")


def test_missing_run_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="dgate extract"):
        cache.read_run(tmp_path)


# -- a damaged cache is rebuilt, never reused or reported in a loop ----------------------------------


def test_a_missing_shard_is_rebuilt_on_the_next_extract(tmp_path, clean, data, weights):
    run = copy_run(clean[0], tmp_path / "run")
    (run / "cache" / "val" / "shard-00000.safetensors").unlink()
    with pytest.raises(CacheMismatchError, match="missing"):
        cache.load_split(run, "val")
    result = run_extract(run, data, weights)
    assert result.splits["train"].reused and not result.splits["val"].reused
    assert any("val" in n and "damaged" in n for n in result.notes)
    assert_same_cache(run, clean[0], "val")


def test_a_truncated_shard_is_a_clear_error_then_rebuilt(tmp_path, clean, data, weights):
    run = copy_run(clean[0], tmp_path / "run")
    shard = run / "cache" / "train" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CacheMismatchError, match="corrupt") as info:
        cache.load_split(run, "train")
    assert "\n" not in str(info.value) and "dgate extract" in str(info.value)
    result = run_extract(run, data, weights)
    assert not result.splits["train"].reused and result.splits["val"].reused
    assert_same_cache(run, clean[0], "train")


@pytest.mark.parametrize("content", ["[]", '{"format_version": 1}'])
def test_a_run_json_that_is_not_a_run_config(tmp_path, clean, content):
    run = copy_run(clean[0], tmp_path / "run")
    (run / "run.json").write_text(content)
    with pytest.raises(CacheMismatchError, match="--overwrite"):
        cache.read_run(run)
