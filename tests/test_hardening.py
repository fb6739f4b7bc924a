"""Bad input and faults: each ends in exit 2 with one line naming the problem and the fix, nothing is
lost, nothing stale is reused, and no file is half-written."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import dgate_cli
from dgate_cli import cache
from dgate_cli.cli.app import app
from dgate_cli.errors import BusyError, CacheMismatchError, ManifestError, NotFittedError, TargetUnreachableError
from dgate_cli.evaluation import bench as bench_lib
from dgate_cli.pipeline import demo
from dgate_cli.pipeline import extract as extract_lib
from dgate_cli.pipeline.calibrate import calibrate, read_calibration
from dgate_cli.pipeline.export import export
from dgate_cli.pipeline.extract import extract
from dgate_cli.pipeline.fit import fit, read_gates
from dgate_cli.runtime import manifest
from dgate_cli.runtime.model import GatedModel
from dgate_cli.thresholds.outcomes import GateOutcomes
from dgate_cli.thresholds.search import search

TORCH_THREADS = 1
ENV = {"COLUMNS": "400", "DGATE_DEBUG": None}
SIZES = {"train": 100, "val": 60, "test": 40}


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def strict_json(text: str):
    """Parse as a strict JSON parser would: NaN, Infinity and -Infinity are not JSON."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def data(base: Path) -> dict[str, Path]:
    return demo.write_dataset(base / "data", SIZES, seed=5)


@pytest.fixture(scope="module")
def weights(base: Path) -> Path:
    torch.manual_seed(0)
    path = base / "w.safetensors"
    save_file(demo.demo_cnn().state_dict(), str(path))
    return path


def run_args(run: Path, data: dict[str, Path], weights: Path, *extra: object) -> list[object]:
    return [
        "extract", run, "--model", "demo_cnn", "--weights", weights, "--train", data["train"], "--val", data["val"],
        "--workers", "0", "--batch-size", "50", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def calibrated(base: Path, data, weights) -> Path:
    run = base / "run"
    splits = {k: str(v) for k, v in data.items()}
    extract(run, "demo_cnn", splits, weights=str(weights), workers=0, batch_size=50, device="cpu", shard_size=32)
    fit(run, C=0.1)
    calibrate(run, max_drop=0.05)
    return run


@pytest.fixture(scope="module")
def exported(base: Path, calibrated: Path) -> Path:
    export(calibrated, base / "model")
    return base / "model"


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


# -- thresholds in the runtime's arithmetic ------------------------------------------------------------


def test_thresholds_are_float32_between_scores_one_ulp_apart():
    """The float64 midpoint of 1.0 and the next float32 rounds back onto 1.0 in float32: the lower
    sample would leave too, wrongly. The search must return float32 thresholds that keep it."""
    hi = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))
    oc = GateOutcomes(
        scores=torch.tensor([[hi], [1.0]]),
        correct=torch.tensor([[True], [False]]),
        final_correct=torch.tensor([True, True]),
        reach_costs=torch.tensor([1.0, 9.0], dtype=torch.float64),
        gate_costs=torch.tensor([0.5], dtype=torch.float64),
    )
    p = search(oc, target=1.0)
    assert p.accuracy == 1.0 and p.exit_fractions == (0.5, 0.5)
    t = p.thresholds[0]
    assert torch.tensor(t, dtype=torch.float32).item() == t  # exactly a float32
    assert 1.0 < t <= hi
    # the runtime's comparison (float32 scores against the float32 threshold) agrees
    assert (torch.tensor([hi, 1.0]) >= torch.tensor(t, dtype=torch.float32)).tolist() == [True, False]


def test_every_threshold_the_search_returns_is_a_float32():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(300, 3, generator=g)
    oc = GateOutcomes(
        scores,
        torch.rand(300, 3, generator=g) < scores + 0.2,
        torch.rand(300, generator=g) < 0.9,
        torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
        torch.tensor([0.05, 0.05, 0.05], dtype=torch.float64),
    )
    for target in (0.9, 0.85, 0.8):
        try:
            p = search(oc, target=target)
        except TargetUnreachableError:
            continue
        assert all(t in (math.inf, -math.inf) or float(torch.tensor(t).float()) == t for t in p.thresholds)
        e = oc.exits(p.thresholds)
        correct = oc.all_correct().gather(1, e[:, None]).double().mean()
        assert float(correct) == p.accuracy >= target


# -- stale artefacts ------------------------------------------------------------------------------------


def test_gates_fitted_on_other_train_images_are_refused(calibrated, data, weights, tmp_path):
    run = copy_run(calibrated, tmp_path)
    train = Path(shutil.copytree(data["train"], tmp_path / "train"))
    victim = sorted(train.rglob("*.png"))[0]
    victim.unlink()  # the train split changes: it is extracted again
    splits = {"train": str(train), "val": str(data["val"])}
    result = extract(run, "demo_cnn", splits, weights=str(weights), workers=0, batch_size=50, device="cpu")
    assert any("train cache was made from other files" in n for n in result.notes)
    with pytest.raises(CacheMismatchError, match="fitted on other train images.*dgate fit"):
        read_gates(run)
    with pytest.raises(CacheMismatchError, match="fitted on other train images"):
        calibrate(run, max_drop=0.05)
    with pytest.raises(CacheMismatchError, match="fitted on other train images"):
        export(run, tmp_path / "out")


def test_thresholds_calibrated_on_other_images_are_refused(calibrated, data, weights, tmp_path):
    run = copy_run(calibrated, tmp_path)
    val = Path(shutil.copytree(data["val"], tmp_path / "val"))
    victim = sorted(val.rglob("*.png"))[0]
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))  # same size, rewritten
    splits = {"train": str(data["train"]), "val": str(val)}
    result = extract(run, "demo_cnn", splits, weights=str(weights), workers=0, batch_size=50, device="cpu")
    assert any("val cache was made from other files" in n for n in result.notes)
    with pytest.raises(NotFittedError, match="calibrated on other val images.*dgate calibrate"):
        read_calibration(run)
    err = one_line_error(invoke("export", run, "--out", tmp_path / "out"))
    assert "calibrated on other val images" in err
    assert not (tmp_path / "out").exists()


# -- GatedModel --------------------------------------------------------------------------------------------


def tiny_gated() -> GatedModel:
    from dgate_cli.gates.pooling import Pooling

    torch.manual_seed(0)
    stages = [nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))]
    return GatedModel(stages, [torch.randn(3, 4)], [torch.zeros(3)], ["nchw"], Pooling(), [0.5])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([1.0, 2.0], "expected 1 thresholds"),
        ([math.nan], "not NaN"),
        (["x"], "numbers, 'inf' or None"),
        (3.0, "a list of 1"),
    ],
)
def test_assigned_thresholds_are_checked_like_set_thresholds(bad, message):
    model = tiny_gated()
    with pytest.raises(ValueError, match=message):
        model.thresholds = bad
    with pytest.raises(ValueError, match=message):
        model.set_thresholds(bad)
    assert model.thresholds == [0.5]


def test_in_place_edits_of_gate_weights_are_seen():
    model = tiny_gated()
    x = torch.randn(5, 3, 8, 8)
    h = model.stages[0](x)
    before = model.gate_outputs(0, h)
    with torch.no_grad():
        model.gates[0].weight.mul_(2.0)
    torch.testing.assert_close(model.gate_outputs(0, h), 2 * before)
    with torch.no_grad():
        model.gates[0].bias.add_(1.0)
    torch.testing.assert_close(model.gate_outputs(0, h), 2 * before + 1)
    model.gates[0].weight = torch.zeros(3, 4)  # replaced outright
    torch.testing.assert_close(model.gate_outputs(0, h), torch.ones(5, 3))


# -- extraction ----------------------------------------------------------------------------------------------


class OffsetNet(nn.Module):
    """A model whose forward reads a buffer directly (a get_attr node), as Swin reads its position index."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("offset", torch.ones(1, 4, 1, 1))
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x):
        x = torch.relu(self.conv(x)) + self.offset
        return self.head(torch.relu(self.body(x)))


def test_extract_moves_the_stages_with_the_buffers_only_they_own(data, tmp_path, monkeypatch):
    """Every tensor of every stage goes to the device, including buffers a stage copied from the model."""
    seen = {}

    def capture(run_dir, split, dataset, backbone, stages, *args):
        seen[split] = [t.device.type for s in stages for t in [*s.parameters(), *s.buffers()]]
        return extract_lib.SplitSummary(split, str(dataset.spec), len(dataset), 0.0, 0.0, reused=True)

    monkeypatch.setattr(extract_lib, "resolve_device", lambda device: torch.device("meta"))
    monkeypatch.setattr(extract_lib, "_extract_split", capture)
    splits = {"train": str(data["train"]), "val": str(data["val"])}
    extract(tmp_path / "run", "offset:net", splits, workers=0, gates=["conv"], channels_last=False, factory=OffsetNet)
    assert seen["train"] and set(seen["train"]) == {"meta"}, seen


def test_two_processes_cannot_extract_into_one_run_directory(data, weights, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dgate_cli import cache\n"
         "with cache.locked(sys.argv[1], 'extract'):\n    print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BusyError, match=rf"in use by dgate extract \(pid {holder.pid}, since .*\); wait for it"):
            extract(
                run, "demo_cnn", {"train": str(data["train"]), "val": str(data["val"])}, weights=str(weights), workers=0
            )
        err = one_line_error(invoke(*run_args(run, data, weights)))
        assert f"pid {holder.pid}" in err
        assert not (run / "run.json").exists() and not (run / "cache").exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process
    result = extract(
        run, "demo_cnn", {"train": str(data["train"]), "val": str(data["val"])}, weights=str(weights), workers=0
    )
    assert result.splits["train"].images == SIZES["train"]


# -- the cache's contents ---------------------------------------------------------------------------------------


def flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-64:-60] = bytes(b ^ 0x5A for b in raw[-64:-60])  # inside the last tensor's data, not the header
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_a_shard_are_detected_and_rebuilt(calibrated, data, weights, tmp_path):
    run = copy_run(calibrated, tmp_path)
    shard = sorted((run / "cache" / "train").glob("shard-*.safetensors"))[1]
    flip_bytes(shard)
    with pytest.raises(
        CacheMismatchError, match=rf"train cache of .* is damaged \({shard.name} does not match its checksum"
    ):
        cache.load_split(run, "train")
    err = one_line_error(invoke("fit", run))
    assert "does not match its checksum" in err and "dgate extract" in err
    splits = {k: str(v) for k, v in data.items()}
    result = extract(run, "demo_cnn", splits, weights=str(weights), workers=0, batch_size=50, shard_size=32)
    assert any("train cache is damaged" in n for n in result.notes)
    assert not result.splits["train"].reused and result.splits["val"].reused
    clean = cache.load_split(calibrated, "train")
    again = cache.load_split(run, "train")
    assert all(torch.equal(clean.features[g], again.features[g]) for g in clean.features)


def test_an_index_cut_short_is_refused(calibrated, tmp_path):
    run = copy_run(calibrated, tmp_path)
    path = run / "cache" / "train" / "index.json"
    index = json.loads(path.read_text())
    assert index["complete"] and len(index["shards"]) == 4
    index["shards"] = index["shards"][:2]  # still "complete": true
    path.write_text(json.dumps(index))
    with pytest.raises(CacheMismatchError, match=r"its shards hold 64 samples, the data has 100"):
        cache.load_split(run, "train")
    err = one_line_error(invoke("fit", run))
    assert "its shards hold 64 samples" in err


def test_nan_features_are_refused_with_a_clear_message(calibrated, tmp_path):
    from safetensors.torch import load_file

    run = copy_run(calibrated, tmp_path)
    d = run / "cache" / "train"
    shard = d / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.startswith("features."))
    tensors[key][3, 0] = float("nan")
    save_file(tensors, str(shard))
    index = json.loads((d / "index.json").read_text())
    index["shards"][0]["sha256"] = dgate_cli._io.sha256_file(shard)  # a consistent, but NaN, cache
    (d / "index.json").write_text(json.dumps(index))
    err = one_line_error(invoke("fit", run))
    assert "holds NaN or infinite" in err and "1 samples" in err and "--overwrite" in err


def test_a_backbone_that_gives_nan_is_refused_at_extraction(data, tmp_path):
    sd = demo.demo_cnn().state_dict()
    sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
    w = tmp_path / "nan.safetensors"
    save_file(sd, str(w))
    err = one_line_error(invoke(*run_args(tmp_path / "run", data, w)))
    assert "NaN or infinite values" in err and "check the weights" in err


# -- sizes ----------------------------------------------------------------------------------------------------


def test_an_impossible_crop_is_refused_before_any_work(data, weights, tmp_path):
    err = one_line_error(invoke(*run_args(tmp_path / "run", data, weights, "--crop", "100000")))
    assert "--crop 100000" in err and "use a smaller --crop or --batch-size" in err
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_pool_grid_finer_than_the_stage_is_refused(data, weights, tmp_path):
    err = one_line_error(invoke(*run_args(tmp_path / "run", data, weights, "--pool", "1000")))
    assert "--pool 1000 asks for a 1000x1000 grid" in err and "use grid sizes up to" in err
    assert not (tmp_path / "run" / "run.json").exists()


# -- the manifest ---------------------------------------------------------------------------------------------


def edit_manifest(d: Path, edit, reseal: bool = True) -> None:
    path = d / manifest.MANIFEST
    m = json.loads(path.read_text())
    edit(m)
    if reseal:
        with contextlib.suppress(ValueError):  # NaN: no canonical JSON to hash; written as Python writes it
            m = manifest.seal(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["thresholds"].__setitem__(0, float("nan")), "is corrupt (NaN is not valid JSON)"),
        (
            lambda m: m["weights"].__setitem__("file", "../outside.safetensors"),
            "is not a file name inside the model directory",
        ),
        (lambda m: m.__setitem__("classes", [1, 2]), "'classes' is missing or has entries of the wrong type"),
        (lambda m: m.__setitem__("classes", ["a", "a"]), "distinct names"),
        (lambda m: m.__setitem__("score", "vibes"), "score must be one of"),
        (lambda m: m["gates"][0].__setitem__("layout", "xyz"), "layout must be one of"),
        (lambda m: m["costs"].__setitem__("reach", [-1.0] * len(m["costs"]["reach"])), "finite non-negative"),
        (lambda m: m.__setitem__("input_size", 0), "'input_size' must be positive"),
        (lambda m: m["frontier"][0].__setitem__("thresholds", [1.0]), "frontier[0] has 1 thresholds"),
    ],
)
def test_every_manifest_field_is_validated(exported, tmp_path, edit, message):
    d = Path(shutil.copytree(exported, tmp_path / "m"))
    edit_manifest(d, edit)
    with pytest.raises(ManifestError, match=re_escape(message)):
        dgate_cli.load(d)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_a_hand_edited_manifest_is_refused_unless_accepted(exported, tmp_path):
    d = Path(shutil.copytree(exported, tmp_path / "m"))
    edit_manifest(d, lambda m: m["thresholds"].__setitem__(0, -5.0), reseal=False)
    with pytest.raises(ManifestError, match=r"was changed after export .*verify=False"):
        dgate_cli.load(d)
    model = dgate_cli.load(d, verify=False)
    assert model.thresholds[0] == -5.0


def test_exported_directories_follow_the_umask(calibrated, tmp_path):
    old = os.umask(0o022)
    try:
        out = export(calibrated, tmp_path / "m").out_dir
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "dgate.json").stat().st_mode & 0o777 == 0o644


# -- changing a run's settings ------------------------------------------------------------------------------------


def test_other_gates_on_a_run_say_what_they_remove(calibrated, data, weights, tmp_path):
    run = copy_run(calibrated, tmp_path)
    result = invoke(*run_args(run, data, weights, "--gates", "stage1,stage2"))
    assert result.exit_code == 0, result.stderr
    assert (
        f"{run} was extracted with other gates: removed the cache of test, train, val, the fitted gates, "
        "the calibration; the test split is not rebuilt: pass --test DATA" in " ".join(result.stderr.split())
    )
    assert not (run / "gates.json").exists() and not (run / "cache" / "test").exists()


# -- messages that mislead ---------------------------------------------------------------------------------------


def test_a_class_mismatch_names_the_classes_that_differ(data, weights, tmp_path):
    val = Path(shutil.copytree(data["val"], tmp_path / "val"))
    classes = sorted(p.name for p in val.iterdir())
    (val / classes[-1]).rename(val / "zebra")
    err = one_line_error(
        invoke(
            "extract",
            tmp_path / "run",
            "--model",
            "demo_cnn",
            "--weights",
            weights,
            "--train",
            data["train"],
            "--val",
            val,
            "--workers",
            "0",
        )  # fmt: skip
    )
    assert f"the val data has classes that train lacks (zebra) and lacks some that train has ({classes[-1]})" in err


def test_a_plot_in_a_missing_directory_is_refused_before_calibrating(calibrated, tmp_path):
    run = copy_run(calibrated, tmp_path)
    before = (run / "calibration.json").stat().st_mtime_ns
    err = one_line_error(invoke("calibrate", run, "--max-drop", "0.05", "--plot", tmp_path / "missing" / "x.png"))
    assert "the directory" in err and "does not exist" in err
    assert not (tmp_path / "missing").exists()
    assert (run / "calibration.json").stat().st_mtime_ns == before


# -- --json everywhere -----------------------------------------------------------------------------------------------


def test_every_json_output_is_strict_json(calibrated, exported, data, weights, tmp_path):
    run = copy_run(calibrated, tmp_path)
    outputs = {
        "extract": invoke(*run_args(run, data, weights, "--json")),
        "fit": invoke("fit", run, "--C", "0.1", "--json"),
        "calibrate": invoke("calibrate", run, "--max-drop", "0.05", "--json"),
        "export": invoke("export", run, "--out", tmp_path / "m", "--json"),
        "evaluate": invoke("evaluate", exported, "--data", data["test"], "--workers", "0", "--json"),
        "bench": invoke(
            "bench",
            exported,
            "--data",
            data["test"],
            "--images",
            "8",
            "--batch-size",
            "4",
            "--thresholds",
            ",".join(["-inf"] + ["inf"] * 4),
            "--json",
        ),  # fmt: skip
        "stages": invoke("stages", "demo_cnn", "--json"),
        "models": invoke("models", "--json"),
    }
    for name, result in outputs.items():
        assert result.exit_code == 0, (name, result.stderr)
        strict_json(result.stdout)
    assert "cifar_resnet56" in strict_json(outputs["models"].stdout)["builtin"]
    assert strict_json(outputs["bench"].stdout)["thresholds"][0] == "-inf"


def test_bench_measures_accuracy_at_each_rows_batch_size(exported, data, monkeypatch):
    model = dgate_cli.load(exported)
    seen = []
    real = GatedModel.forward

    def spy(self, x):
        seen.append(int(x.shape[0]))
        return real(self, x)

    monkeypatch.setattr(GatedModel, "forward", spy)
    x = torch.rand(24, 3, 32, 32)
    y = torch.randint(0, 10, (24,))
    r = bench_lib.bench(model, x, y, batch_sizes=[8], warmup=0, repeats=1)
    assert set(seen) == {8}, sorted(set(seen))
    assert r.rows[0].accuracy is not None


# -- kept as they were: each case still ends in exit 2 or a bit-identical resume -------------------------------------


KILL_SCRIPT = """
import sys, time
from dgate_cli.pipeline.extract import extract
run, train, val, weights = sys.argv[1:5]
def slow(split, done, total):
    if split == "train" and done >= 64:
        print("shard written", flush=True)
        time.sleep(600)
extract(run, "demo_cnn", {"train": train, "val": val}, weights=weights, workers=0, batch_size=50, device="cpu",
        shard_size=32, progress=slow)
"""


def test_kill_9_during_extract_then_rerun_gives_the_same_cache_gates_and_thresholds(
    calibrated, data, weights, tmp_path
):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(run), str(data["train"]), str(data["val"]), str(weights)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "shard written"
        deadline = time.time() + 30
        while len((cache.read_index(run, "train") or cache.SplitIndex("", "", "", 0, 0, [])).shards) < 1:
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    assert not cache.read_index(run, "train").complete
    splits = {"train": str(data["train"]), "val": str(data["val"])}
    result = extract(
        run, "demo_cnn", splits, weights=str(weights), workers=0, batch_size=50, device="cpu", shard_size=32
    )
    assert result.splits["train"].resumed_from >= 32
    for split in splits:
        a, b = cache.load_split(run, split), cache.load_split(calibrated, split)
        assert torch.equal(a.logits, b.logits) and all(torch.equal(a.features[g], b.features[g]) for g in a.features)
    fit(run, C=0.1)
    calibrate(run, max_drop=0.05)
    ga, gb = read_gates(run), read_gates(calibrated)
    assert all(torch.equal(ga.weights[n], gb.weights[n]) for n in ga.names)
    assert read_calibration(run)["chosen"] == read_calibration(calibrated)["chosen"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_extract_options(data, weights, tmp_path, args, message):
    result = invoke(*run_args(tmp_path / "run", data, weights, *args))
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-acc", "nan"], "--target-acc must be a fraction in (0, 1]"),
        (["--target-acc", "1.5"], "--target-acc must be a fraction in (0, 1]"),
        (["--max-drop", "-0.1"], "--max-drop must be a fraction in [0, 1)"),
        (["--max-drop", "nan"], "--max-drop must be a fraction in [0, 1)"),
        (["--target-acc", "1.0"], "no thresholds reach accuracy 1.0000"),
    ],
)
def test_impossible_targets(calibrated, tmp_path, args, message):
    run = copy_run(calibrated, tmp_path)
    before = (run / "calibration.json").read_bytes()
    err = one_line_error(invoke("calibrate", run, *args))
    assert message in err
    assert (run / "calibration.json").read_bytes() == before  # nothing lost
