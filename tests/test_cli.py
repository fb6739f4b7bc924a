"""The ``dgate`` command line: help, --json output, the one-line error funnel, argument wiring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DEMO_GATES, R20_GATES, near_threshold, near_tie
from safetensors.torch import save_file
from typer.testing import CliRunner

from dgate_cli import cache
from dgate_cli.cli.app import app
from dgate_cli.data.datasets import open_dataset
from dgate_cli.errors import DgateError, MissingFileError
from dgate_cli.models import cifar_resnet
from dgate_cli.models.backbone import build_backbone
from dgate_cli.pipeline import demo
from dgate_cli.pipeline.calibrate import outcomes
from dgate_cli.pipeline.fit import FitResult, read_gates

# COLUMNS: rich must not wrap long lines; DGATE_DEBUG unset so errors go through the funnel.
ENV = {"COLUMNS": "400", "DGATE_DEBUG": None}


def invoke(*args: object, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env={**ENV, **(env or {})})


def one_line_error(result) -> str:
    """Assert the command failed through the funnel and return its one-line message."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error:"), err
    assert "\n" not in err, f"error is not one line: {err!r}"
    assert result.stdout == "", result.stdout
    return err


def no_partial_files(run_dir: Path) -> None:
    """Nothing of a run was written: no run.json, no shards, no temporary files."""
    if not run_dir.exists():
        return
    files = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")]
    assert not (run_dir / "run.json").exists(), files
    assert not list(run_dir.rglob("*.safetensors")), files
    assert not list(run_dir.rglob("*.incomplete")), files
    assert not list(run_dir.rglob("index.json")), files


# -- shared setup ------------------------------------------------------------------------------------


TORCH_THREADS = 1  # tiny models and many small tensor ops (see conftest._threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)  # module fixtures run before the function-scoped thread setting
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def data(base: Path) -> dict[str, Path]:
    return demo.write_dataset(base / "data", {"train": 120, "val": 80}, seed=3)


@pytest.fixture(scope="module")
def weights(base: Path) -> Path:
    """A fixed random-init demo CNN (fixed, so that the test can run the very same model)."""
    torch.manual_seed(0)
    path = base / "demo_random.safetensors"
    save_file(demo.demo_cnn().state_dict(), str(path))
    return path


def extract_args(run_dir: Path, data: dict[str, Path], weights: Path, *extra: object) -> list[object]:
    return [
        "extract", run_dir, "--model", "demo_cnn", "--weights", weights, "--train", data["train"], "--val", data["val"],
        "--workers", "0", "--batch-size", "64", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def extracted(base: Path, data: dict[str, Path], weights: Path):
    run = base / "extracted"
    result = invoke(*extract_args(run, data, weights, "--json"))
    assert result.exit_code == 0, (result.stderr, result.exception)
    return run, result


@pytest.fixture(scope="module")
def fitted(base: Path, extracted) -> Path:
    run = base / "fitted"
    shutil.copytree(extracted[0], run)
    result = invoke("fit", run, "--C", "0.1", "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert (run / "gates.safetensors").is_file() and (run / "gates.json").is_file()
    return run


@pytest.fixture(scope="module")
def calibrated(base: Path, fitted: Path) -> Path:
    run = base / "calibrated"
    shutil.copytree(fitted, run)
    result = invoke("calibrate", run, "--max-drop", "0.05", "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert (run / "calibration.json").is_file()
    return run


# -- help --------------------------------------------------------------------------------------------


COMMANDS = ("demo", "extract", "fit", "calibrate", "cascade", "export", "evaluate", "bench", "stages", "models")


def first_doc_line(fn) -> str:
    return " ".join((fn.__doc__ or "").strip().splitlines()[0].split())


def test_every_command_is_registered_and_listed_in_the_help():
    registered = {c.name: c.callback for c in app.registered_commands}
    assert sorted(registered) == sorted(COMMANDS)  # each once, and nothing else
    assert len(app.registered_commands) == len(COMMANDS)
    result = invoke("--help")
    assert result.exit_code == 0, result.stderr
    # the rows of the Commands panel, not words anywhere in the text (the app's description names
    # several commands itself): each row starts with a command's name followed by its summary
    panel = result.stdout.split("Commands")[-1]
    lines = [line.lstrip()[1:] for line in panel.splitlines() if line.lstrip().startswith("│")]
    rows = {line.split()[0]: line for line in lines if line[:1] == " " and line[1:2] not in (" ", "")}
    assert sorted(rows) == sorted(COMMANDS), rows.keys()
    for name, callback in registered.items():
        assert first_doc_line(callback) in " ".join(panel.split()), name
    unknown = invoke("no-such-command")
    assert unknown.exit_code == 2 and "No such command" in unknown.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_its_own_help(name: str):
    (callback,) = [c.callback for c in app.registered_commands if c.name == name]
    result = invoke(name, "--help")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert f"Usage: dgate {name} " in result.stdout
    assert first_doc_line(callback) in " ".join(result.stdout.split())  # its own docstring, not another's


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (
            "extract",
            [
                "--model",
                "--weights",
                "--model-kwargs",
                "--train",
                "--val",
                "--test",
                "--gates",
                "--pool",
                "--json",
                "--overwrite",
            ],
        ),
        ("fit", ["--loss", "--C", "--target", "--holdout", "--json"]),
        ("calibrate", ["--max-drop", "--target-acc", "--split", "--score", "--gates", "--json"]),
        ("export", ["--out", "--overwrite", "--json"]),
        ("evaluate", ["--data", "--batch-size", "--images", "--max-drop", "--thresholds", "--no-verify", "--json"]),
        ("stages", ["--all", "--json", "--weights"]),
        ("models", []),
        ("demo", ["--epochs", "--max-drop", "--json"]),
    ],
)
def test_subcommand_help_mentions_its_options(command: str, options: list[str]):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.stderr
    assert "Usage" in result.stdout
    for opt in options:
        assert opt in result.stdout, f"{command} --help does not mention {opt}"


# -- extract --json ----------------------------------------------------------------------------------


def test_extract_json_reports_sizes_and_the_backbone_accuracy(extracted, data, weights):
    run, result = extracted
    out = json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout
    assert isinstance(out, dict)
    assert set(out["splits"]) == {"train", "val"}
    bb = build_backbone("demo_cnn", weights=str(weights))
    for split, folder in data.items():
        ds = open_dataset(str(folder), bb.preprocess)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        labels = torch.tensor(ds.labels)
        with torch.inference_mode():
            logits = bb.module(bb.preprocess.normalize(images))
        pred = logits.argmax(1)
        assert pred.unique().numel() > 1, "precondition: the model's predictions vary"
        expected = int((pred == labels).sum()) / len(ds)
        n_files = sum(1 for _ in folder.rglob("*.png"))
        s = out["splits"][split]
        assert s["images"] == len(ds) == n_files
        # extract runs channels-last batches of 64: a near tie between two classes may go either way
        slack = float(near_tie(logits).sum()) / len(ds)
        assert s["backbone_accuracy"] == pytest.approx(expected, abs=slack + 1e-12)
        assert s["reused"] is False
    assert out["gates"] == DEMO_GATES
    assert json.loads((run / "run.json").read_text())["model"]["spec"] == "demo_cnn"


def test_extract_without_json_prints_a_table_not_json(base, extracted, data, weights):
    run = base / "table"
    shutil.copytree(extracted[0], run)
    result = invoke(*extract_args(run, data, weights))
    assert result.exit_code == 0, result.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)
    assert "reused" in result.stdout and "next: dgate fit" in result.stdout


# -- bad input: one line on stderr, exit 2, nothing half-written -------------------------------------


def test_missing_data_dir(tmp_path, data, weights):
    run = tmp_path / "run"
    err = one_line_error(invoke(*extract_args(run, {"train": tmp_path / "nope", "val": data["val"]}, weights)))
    assert "nope" in err and "does not exist" in err
    no_partial_files(run)


def test_folder_without_images(tmp_path, data, weights):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    (empty / "b" / "notes.txt").write_text("not an image")
    run = tmp_path / "run"
    err = one_line_error(invoke(*extract_args(run, {"train": data["train"], "val": empty}, weights)))
    assert "no images" in err and str(empty) in err
    no_partial_files(run)


def test_unknown_model(tmp_path, data):
    run = tmp_path / "run"
    err = one_line_error(
        invoke(
            "extract",
            run,
            "--model",
            "resnet_nonexistent",
            "--train",
            data["train"],
            "--val",
            data["val"],
            "--workers",
            "0",
        )
    )
    assert "resnet_nonexistent" in err and "dgate models" in err
    no_partial_files(run)


def test_checkpoint_of_another_architecture(tmp_path, data):
    ckpt = tmp_path / "r20.pt"
    torch.save(cifar_resnet(20).state_dict(), ckpt)
    run = tmp_path / "run"
    err = one_line_error(
        invoke(
            "extract",
            run,
            "--model",
            "cifar_resnet32",
            "--weights",
            ckpt,
            "--train",
            data["train"],
            "--val",
            data["val"],
            "--workers",
            "0",
        )
    )
    assert "missing" in err and "layer1.3" in err, err
    assert "cifar_resnet32" in err
    no_partial_files(run)


def test_gate_that_is_not_a_module(tmp_path, data, weights):
    run = tmp_path / "run"
    err = one_line_error(invoke(*extract_args(run, data, weights, "--gates", "stage1,stage9")))
    assert "stage9" in err and "dgate stages" in err
    no_partial_files(run)


def test_bad_model_kwargs_json(tmp_path, data, weights):
    run = tmp_path / "run"
    err = one_line_error(invoke(*extract_args(run, data, weights, "--model-kwargs", "{num_classes: 10")))
    assert "--model-kwargs" in err and "JSON" in err
    no_partial_files(run)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(tmp_path, data, weights):
    run = tmp_path / "run"
    err = one_line_error(invoke(*extract_args(run, data, weights, "--device", "cuda")))
    assert "cuda" in err and "--device cpu" in err
    no_partial_files(run)


def test_extract_without_val_is_refused(tmp_path, data, weights):
    run = tmp_path / "run"
    err = one_line_error(invoke("extract", run, "--model", "demo_cnn", "--weights", weights, "--train", data["train"]))
    assert "--val" in err
    no_partial_files(run)


def test_run_dir_of_another_model_is_left_alone(tmp_path, data):
    run = tmp_path / "run"
    first = invoke(
        "extract",
        run,
        "--model",
        "cifar_resnet20",
        "--train",
        data["train"],
        "--val",
        data["val"],
        "--workers",
        "0",
        "--json",
    )
    assert first.exit_code == 0, first.stderr
    before = (run / "run.json").read_bytes()
    shards = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    assert shards
    err = one_line_error(
        invoke("extract", run, "--model", "demo_cnn", "--train", data["train"], "--val", data["val"], "--workers", "0")
    )
    assert "cifar_resnet20" in err and "--overwrite" in err
    assert (run / "run.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")} == shards
    assert not list(run.rglob("*.incomplete"))


def test_calibrate_before_fit(base, extracted):
    run = extracted[0]
    err = one_line_error(invoke("calibrate", run, "--max-drop", "0.01"))
    assert "dgate fit" in err
    assert not (run / "calibration.json").exists()


def test_calibrate_to_an_unreachable_accuracy(tmp_path, fitted):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    err = one_line_error(invoke("calibrate", run, "--target-acc", "1.0"))
    assert "best reachable" in err and "backbone" in err
    assert not (run / "calibration.json").exists()


def test_calibrate_with_both_targets(fitted):
    err = one_line_error(invoke("calibrate", fitted, "--target-acc", "0.9", "--max-drop", "0.01"))
    assert "--target-acc" in err and "--max-drop" in err
    assert not (fitted / "calibration.json").exists()


def test_evaluate_a_directory_that_is_not_an_export(tmp_path, data):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "something.txt").write_text("x")
    err = one_line_error(invoke("evaluate", tmp_path / "model", "--data", data["val"], "--workers", "0"))
    assert "dgate.json" in err and "dgate export" in err


def test_export_into_an_existing_foreign_directory(tmp_path, calibrated):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    err = one_line_error(invoke("export", calibrated, "--out", out))
    assert str(out) in err and "not a dgate export" in err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".incomplete")]


def test_export_before_calibrate_writes_nothing(tmp_path, fitted):
    out = tmp_path / "model"
    err = one_line_error(invoke("export", fitted, "--out", out))
    assert "dgate calibrate" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_then_evaluate_through_the_cli(tmp_path, calibrated, data):
    out = tmp_path / "model"
    result = invoke("export", calibrated, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["out_dir"] == str(out)
    result = invoke("evaluate", out, "--data", data["val"], "--workers", "0", "--batch-size", "32", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    cal = json.loads((calibrated / "calibration.json").read_text())
    assert report["images"] == 80
    # the runtime computes the cached scores and logits again, up to float rounding: a sample within
    # rounding of a threshold (or of a tie between classes) may go either way, none other
    val, fitted_gates = cache.load_split(calibrated, "val"), read_gates(calibrated)
    oc, _ = outcomes(cache.read_run(calibrated), fitted_gates, val, cal["gates"], cal["score"])
    ties = [near_tie(fitted_gates.outputs(n, val.features[n])) for n in cal["gates"]] + [near_tie(val.logits)]
    ties = torch.stack(ties, 1)
    thresholds = [float(t) for t in cal["chosen"]["thresholds"]]
    near = near_threshold(oc.scores, thresholds, oc.exits(thresholds), ties)
    slack = float(near.sum()) / 80
    assert report["accuracy"] == pytest.approx(cal["chosen"]["accuracy"], abs=slack + 1e-12)
    slack = float(near_tie(val.logits).sum()) / 80
    assert report["backbone_accuracy"] == pytest.approx(cal["backbone_accuracy"], abs=slack + 1e-12)


def test_evaluate_picks_another_operating_point(tmp_path, calibrated, data):
    out = tmp_path / "model"
    assert invoke("export", calibrated, "--out", out, "--json").exit_code == 0
    manifest = json.loads((out / "dgate.json").read_text())
    gates = len(manifest["gates"])
    args = ("evaluate", out, "--data", data["val"], "--workers", "0", "--json")
    result = invoke(*args, "--thresholds", ",".join(["inf"] * gates))
    assert result.exit_code == 0, result.stderr
    closed = json.loads(result.stdout)
    assert closed["thresholds"] == ["inf"] * gates
    assert closed["exit_fractions"]["backbone"] == 1.0 and closed["accuracy"] == closed["backbone_accuracy"]
    result = invoke(*args, "--max-drop", "1.0")  # every stored point qualifies: the cheapest is taken
    assert result.exit_code == 0, result.stderr
    cheapest = min(manifest["frontier"], key=lambda p: p["mean_cost"])
    assert json.loads(result.stdout)["thresholds"] == cheapest["thresholds"]
    err = one_line_error(invoke(*args, "--thresholds", "1.0"))
    assert f"expected {gates} thresholds (one per gate), got 1" in err
    assert "not both" in invoke(*args, "--thresholds", "inf", "--max-drop", "0.01").stderr


def test_options_are_the_same_kind_everywhere():
    import typer.main

    commands = typer.main.get_command(app).commands
    for name, command in commands.items():
        params = {opt: p for p in command.params for opt in p.opts}
        assert "--json" in params, f"dgate {name} has no --json"
        assert "--limit" not in params, f"dgate {name}: how many images is --images"
        if "--device" in params:
            assert params["--device"].default == "auto", (
                f"dgate {name} --device defaults to {params['--device'].default}"
            )
        if "--batch-size" in params:
            assert params["--batch-size"].opts == ["--batch-size", "-b"], name
    assert {"--images", "--max-drop", "--thresholds", "--no-verify"} <= {
        opt for p in commands["evaluate"].params for opt in p.opts
    } & {opt for p in commands["bench"].params for opt in p.opts}


def test_os_errors_go_through_the_funnel(tmp_path, data, weights):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    err = one_line_error(invoke(*extract_args(blocker / "run", data, weights)))
    assert "a_file" in err and "directory" in err.lower()
    assert blocker.read_text() == "not a directory"


def test_interrupt_exits_130_and_says_how_to_resume(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dgate_cli.cli.fit.fit", interrupted)
    result = invoke("fit", tmp_path / "run")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "resume" in result.stderr
    assert result.stdout == ""


def test_debug_env_raises_instead_of_the_one_line_message(tmp_path, data, weights):
    run = tmp_path / "run"
    result = invoke(
        *extract_args(run, {"train": tmp_path / "nope", "val": data["val"]}, weights), env={"DGATE_DEBUG": "1"}
    )
    assert result.exit_code != 2
    assert isinstance(result.exception, DgateError)
    assert isinstance(result.exception, MissingFileError)
    assert "error:" not in result.stderr


# -- stages ------------------------------------------------------------------------------------------


def test_stages_json():
    result = invoke("stages", "cifar_resnet20", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    rows = report["rows"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["layer1"]["default"] is True
    assert by_name["layer2"]["default"] is True
    assert [r["name"] for r in rows if r["default"]] == R20_GATES
    cum = [r["cumulative_macs"] for r in rows]
    assert all(b > a for a, b in zip(cum[:-1], cum[1:], strict=True)), cum
    assert 0 < rows[-1]["fraction"] < 1
    assert rows[-1]["cumulative_macs"] < report["total_macs"]


# -- calibrate warnings ------------------------------------------------------------------------------


def test_calibrating_on_the_fitting_split_warns(tmp_path, fitted):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    on_train = invoke("calibrate", run, "--max-drop", "0.05", "--split", "train")
    assert on_train.exit_code == 0, on_train.stderr
    assert "warning:" in on_train.stderr and "train" in on_train.stderr and "held-out" in on_train.stderr
    assert "warning:" not in on_train.stdout
    on_val = invoke("calibrate", run, "--max-drop", "0.05", "--split", "val")
    assert on_val.exit_code == 0, on_val.stderr
    assert "warning:" not in on_val.stderr


# -- argument wiring: the CLI passes options to the library unchanged --------------------------------


def test_fit_passes_its_options(monkeypatch, tmp_path):
    calls = []

    def fake_fit(*args, **kwargs):
        calls.append((args, kwargs))
        return FitResult(Path(args[0]), kwargs["loss"], kwargs["target"], [], 0.0, "cpu")

    monkeypatch.setattr("dgate_cli.cli.fit.fit", fake_fit)
    result = invoke("fit", tmp_path / "run", "--loss", "ce", "--C", "0.5", "--target", "backbone")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args == (tmp_path / "run",)
    progress = kwargs.pop("progress")
    assert callable(progress)
    assert kwargs == {"loss": "ce", "C": 0.5, "target": "backbone", "holdout": 0.1, "device": "auto", "max_iter": 500}


def test_calibrate_passes_its_options(monkeypatch, tmp_path):
    calls = []

    def fake_calibrate(*args, **kwargs):
        calls.append((args, kwargs))
        return SimpleNamespace(to_dict=lambda: {"fake": True}, warnings=[])

    monkeypatch.setattr("dgate_cli.cli.calibrate.calibrate", fake_calibrate)
    result = invoke(
        "calibrate",
        tmp_path / "run",
        "--target-acc",
        "0.93",
        "--gates",
        "a,b",
        "--confidence",
        "0.9",
        "--reserve",
        "1.5",
        "--gate-overhead",
        "0.01",
        "--json",
    )
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert json.loads(result.stdout) == {"fake": True}
    assert calls == [
        (
            (tmp_path / "run",),
            {
                "target_acc": 0.93,
                "max_drop": None,
                "split": "val",
                "score": None,
                "gates": ["a", "b"],
                "confidence": 0.9,
                "reserve": 1.5,
                "gate_overhead": 0.01,
                "policy": "auto",
                "ensemble": "auto",
            },
        )
    ]


# -- reusing a run's settings; damaged files go through the error funnel ------------------------------


def test_extract_without_model_applies_explicit_options(tmp_path, extracted):
    run = tmp_path / "run"
    shutil.copytree(extracted[0], run)
    result = invoke("extract", run, "--pool", "2", "--workers", 0, "--json")
    assert result.exit_code == 0, result.stderr
    config = json.loads((run / "run.json").read_text())
    assert config["pooling"]["sizes"] == [2]
    out = json.loads(result.stdout)
    assert not out["splits"]["train"]["reused"] and not out["splits"]["val"]["reused"]
    assert any("extracted with other pooling: removed the cache of train, val" in n for n in out["notes"]), out["notes"]
    # the same command again reuses everything
    again = json.loads(invoke("extract", run, "--workers", 0, "--json").stdout)
    assert again["splits"]["train"]["reused"] and again["splits"]["val"]["reused"]


def test_corrupt_shard_is_a_one_line_error_in_fit(tmp_path, fitted):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    shard = run / "cache" / "train" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    msg = one_line_error(invoke("fit", run))
    assert "corrupt" in msg and "dgate extract" in msg


def test_corrupt_calibration_is_a_one_line_error_in_export(tmp_path, calibrated):
    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    (run / "calibration.json").write_text("{not json")
    msg = one_line_error(invoke("export", run, "--out", tmp_path / "model"))
    assert "dgate calibrate" in msg
    assert not (tmp_path / "model").exists()
