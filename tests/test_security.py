"""Nothing runs that the user did not ask for: a model factory named in a file is imported only on request.

Each crafted file names a factory in a module whose import, or whose call, writes a marker file. The
marker must never appear, the module must never be imported, and the error must name the flag.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import dgate_cli
from dgate_cli import cache
from dgate_cli.cli.app import app
from dgate_cli.errors import SpecError, UntrustedCodeError
from dgate_cli.models.backbone import build_backbone
from dgate_cli.pipeline import demo
from dgate_cli.pipeline.calibrate import calibrate
from dgate_cli.pipeline.export import export
from dgate_cli.pipeline.extract import extract
from dgate_cli.pipeline.fit import fit
from dgate_cli.runtime import manifest

TORCH_THREADS = 1
ENV = {"COLUMNS": "400", "DGATE_DEBUG": None}

FACTORY = """
import pathlib
from dgate_cli.models.demo_cnn import demo_cnn
CALLS = []
def make():
    CALLS.append(1)
    return demo_cnn()
"""

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
def make(**kwargs):
    pathlib.Path({marker!r}).write_text("called")
"""


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory):
    """A trusted user factory module and an evil one (whose import writes a marker), on sys.path."""
    d = tmp_path_factory.mktemp("modules")
    marker = d / "MARKER"
    (d / "dgate_sec_factory.py").write_text(FACTORY)
    (d / "dgate_sec_evil.py").write_text(EVIL.format(marker=str(marker)))
    sys.path.insert(0, str(d))
    yield marker
    sys.path.remove(str(d))
    for name in ("dgate_sec_factory", "dgate_sec_evil"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, modules) -> tuple[Path, Path, dict]:
    """A run and an export of a demo CNN built by a user factory (a spec the user wrote: trusted)."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("security")
    data = demo.write_dataset(base / "data", {"train": 100, "val": 60}, seed=4)
    torch.manual_seed(0)
    weights = base / "w.safetensors"
    save_file(demo.demo_cnn().state_dict(), str(weights))
    run = base / "run"
    splits = {k: str(v) for k, v in data.items()}
    extract(run, "dgate_sec_factory:make", splits, weights=str(weights), workers=0, batch_size=50, device="cpu")
    fit(run, C=0.1)
    calibrate(run, max_drop=0.05)
    export(run, base / "model")
    return run, base / "model", data


def reseal(d: Path, edit) -> None:
    """Edit a manifest as a forger would: change it, then rewrite its content hash."""
    path = d / manifest.MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(manifest.seal(data)))


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def test_a_factory_in_a_manifest_runs_only_when_trusted(exported, modules, tmp_path):
    _, model_dir, data = exported
    sys.modules.pop("dgate_sec_factory", None)
    with pytest.raises(
        UntrustedCodeError, match=r"dgate\.json names the model factory 'dgate_sec_factory:make'.*--trust-code"
    ):
        dgate_cli.load(model_dir)
    assert "dgate_sec_factory" not in sys.modules  # not even imported
    model = dgate_cli.load(model_dir, trust_code=True)
    assert sys.modules["dgate_sec_factory"].CALLS == [1]
    x = torch.rand(3, 3, 32, 32)
    assert model(x).pred.shape == (3,)


def test_the_caller_may_pass_the_factory_or_its_module_instead(exported, modules):
    _, model_dir, _ = exported
    calls = []

    def make():
        calls.append(1)
        return demo.demo_cnn()

    a = dgate_cli.load(model_dir, factory=make)
    assert calls == [1]
    import dgate_sec_factory

    b = dgate_cli.load(model_dir, factory=dgate_sec_factory)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(a.backbone_forward(x), b.backbone_forward(x))


@pytest.mark.parametrize(
    ("spec", "kwargs"),
    [("dgate_sec_evil:make", {}), ("os:system", {"command": "touch {marker}"})],
)
def test_a_forged_manifest_runs_no_code(exported, modules, tmp_path, spec, kwargs):
    _, model_dir, data = exported
    marker = modules
    d = copy_of(model_dir, tmp_path)
    kwargs = {k: v.format(marker=marker) for k, v in kwargs.items()}

    def edit(m):
        m["model"] = {"spec": spec, "kwargs": kwargs}

    reseal(d, edit)  # the forger rewrites the hash too: it does not help
    with pytest.raises(UntrustedCodeError, match=rf"names the model factory '{spec}'.*--trust-code"):
        dgate_cli.load(d)
    result = invoke("evaluate", d, "--data", data["val"], "--workers", "0")
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "--trust-code" in err, err
    result = invoke("bench", d, "--data", data["val"], "--images", "8", "--batch-size", "4")
    assert result.exit_code == 2 and "--trust-code" in result.stderr
    assert not marker.exists()
    assert "dgate_sec_evil" not in sys.modules


def test_a_forged_run_json_runs_no_code(exported, modules, tmp_path):
    run, _, data = exported
    marker = modules
    r = copy_of(run, tmp_path)
    run_json = json.loads((r / cache.RUN_FILE).read_text())
    run_json["model"] = {"spec": "dgate_sec_evil:make", "kwargs": {}}
    (r / cache.RUN_FILE).write_text(json.dumps(run_json))
    # extract without --model takes the spec from run.json: a file, so not trusted
    result = invoke("extract", r, "--workers", "0")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "\n" not in err and "run.json names the model factory 'dgate_sec_evil:make'" in err and "--trust-code" in err
    assert not marker.exists() and "dgate_sec_evil" not in sys.modules


def test_export_reads_the_weights_without_running_model_code(exported, modules, tmp_path):
    run, _, _ = exported
    sys.modules.pop("dgate_sec_factory", None)
    out = export(run, tmp_path / "again")
    assert "dgate_sec_factory" not in sys.modules
    assert out.manifest["model"]["spec"] == "dgate_sec_factory:make"


def test_the_working_directory_is_never_added_to_sys_path(tmp_path, monkeypatch):
    marker = tmp_path / "CWD_MARKER"
    (tmp_path / "dgate_cwd_module.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    with pytest.raises(SpecError, match="cannot import 'dgate_cwd_module'.*PYTHONPATH"):
        build_backbone("dgate_cwd_module:make")
    assert sys.path == before and not marker.exists()
