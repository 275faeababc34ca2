"""Issue 16: outputs, temporary files, reports and exit codes a deployment pipeline can trust.

Each test reproduces one reported defect: non-regular outputs were replaced, temporary and spill
files were written beside the input (failing on read-only model folders), exit 2 could leave an
output behind, a stale OUT.data stayed, outputs were always mode 0600, and the Python API
accepted arguments it then misread.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
import graphopt.pipeline as pipeline
from graphopt.errors import InputError, OptionError, PlanError

from ..conftest import DIGITS_DATA, DIGITS_MODEL, run_cli, sha256_of
from ..fs_helpers import IS_ROOT, external_digits, folder_digest, read_only


def _optimize_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["optimize", str(source), str(out), "--calib-data", str(DIGITS_DATA), *extra]


# --- defect 2: outputs that are not regular files -------------------------------------------


def test_symlink_output_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "real.onnx"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    code, _, err = run_cli(_optimize_args(DIGITS_MODEL, link, "--passes", "cleanup"), capsys)
    assert code == 2
    assert "symbolic link" in err and "Traceback" not in err
    assert link.is_symlink() and target.read_bytes() == b"keep me"


def test_fifo_output_is_refused_and_stays_a_fifo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    code, _, err = run_cli(_optimize_args(DIGITS_MODEL, fifo, "--passes", "cleanup"), capsys)
    assert code == 2
    assert "not a regular file (a FIFO)" in err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.skipif(not IS_ROOT, reason="creating a character device needs root")
def test_character_device_output_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    code, _, err = run_cli(_optimize_args(DIGITS_MODEL, device, "--passes", "cleanup"), capsys)
    assert code == 2 and "character device" in err
    assert stat.S_ISCHR(device.lstat().st_mode)


def test_output_data_path_must_be_a_regular_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = external_digits(tmp_path / "in")
    out = tmp_path / "out.onnx"
    (tmp_path / "out.onnx.data").mkdir()
    code, _, err = run_cli(_optimize_args(source, out, "--passes", "cleanup"), capsys)
    assert code == 2 and "out.onnx.data is a folder" in err
    assert not out.exists()


# --- defect 3: nothing written beside the input ---------------------------------------------


@pytest.mark.parametrize("passes", ["quant", "fp16", "lowrank", "sparsify"])
def test_lossy_passes_work_from_a_read_only_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], passes: str
) -> None:
    source = external_digits(tmp_path / "store")
    before = folder_digest(source.parent)
    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = [*_optimize_args(source, out, "--passes", passes), "--tmp-dir", str(scratch)]
    args += ["--min-cosine", "0", "--min-snr", "-100"]  # this test is about files, not accuracy
    with read_only(source.parent):
        code, stdout, err = run_cli(args, capsys)
    assert code == 0, err + stdout
    assert folder_digest(source.parent) == before  # nothing created, nothing changed
    assert list(scratch.iterdir()) == []  # temporary files are cleaned up
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx", "out.onnx.data"]


def test_check_per_tensor_works_on_read_only_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = external_digits(tmp_path / "store")
    candidate = external_digits(tmp_path / "store", "cand.onnx")
    before = folder_digest(source.parent)
    with read_only(source.parent):
        code, stdout, err = run_cli(
            ["check", str(source), str(candidate), "--per-tensor", "--data", str(DIGITS_DATA)],
            capsys,
        )
    assert code == 0, err + stdout
    assert "per-tensor: every matched tensor is within the budget" in stdout
    assert folder_digest(source.parent) == before


def test_temporary_files_follow_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --tmp-dir, the system's temporary folder (TMPDIR) holds the staged output."""
    custom = tmp_path / "custom-tmp"
    custom.mkdir()
    monkeypatch.setenv("TMPDIR", str(custom))
    monkeypatch.setattr(tempfile, "tempdir", None)  # forget the folder cached at first use
    staged: list[Path] = []
    original = pipeline.staging_folder

    def spy(folder: Path):  # type: ignore[no-untyped-def]
        staged.append(folder)
        return original(folder)

    monkeypatch.setattr(pipeline, "staging_folder", spy)
    graphopt.optimize(DIGITS_MODEL, tmp_path / "o.onnx", ["cleanup"], data=str(DIGITS_DATA))
    assert staged == [custom]
    assert list(custom.iterdir()) == []


def test_unwritable_tmp_dir_is_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(
        _optimize_args(DIGITS_MODEL, out, "--passes", "cleanup", "--tmp-dir", str(missing)),
        capsys,
    )
    assert code == 2 and "temporary folder" in err and "does not exist" in err
    assert not out.exists()


# --- defect 4: exit 2 (or an interrupt) leaves no output ------------------------------------


def test_report_path_in_a_file_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = tmp_path / "o.onnx"
    report = blocker / "report.json"
    code, _, err = run_cli(
        _optimize_args(DIGITS_MODEL, out, "--passes", "cleanup", "--report", str(report)), capsys
    )
    assert code == 2 and "is not a folder" in err
    assert not out.exists()


def test_report_in_a_read_only_folder_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    out = tmp_path / "o.onnx"
    args = [*_optimize_args(DIGITS_MODEL, out, "--passes", "cleanup")]
    with read_only(reports):
        code, _, err = run_cli([*args, "--report", str(reports / "r.json")], capsys)
    assert code == 2 and "not writable" in err
    assert not out.exists()


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupted_validation_leaves_the_previous_output(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    signal_name: str,
) -> None:
    from graphopt.cli.commands import Terminated

    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous output")
    interrupt = KeyboardInterrupt if signal_name == "SIGINT" else Terminated

    def stop(*args: object, **kwargs: object) -> None:
        raise interrupt

    monkeypatch.setattr(pipeline, "compare_models", stop)
    code, _, err = run_cli(
        _optimize_args(DIGITS_MODEL, out, "--passes", "cleanup", "--report", str(tmp_path / "r")),
        capsys,
    )
    assert code == (130 if signal_name == "SIGINT" else 143)
    assert "left as it was" in err
    assert out.read_bytes() == b"previous output"
    assert not (tmp_path / "r").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_model_onnxruntime_cannot_load_leaves_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
    )
    source = tmp_path / "custom.onnx"
    onnx.save(model, str(source))
    data = tmp_path / "x.npz"
    np.savez(data, x=np.ones((2, 4), np.float32))
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(
        ["optimize", str(source), str(out), "--passes", "cleanup", "--calib-data", str(data)],
        capsys,
    )
    assert code == 2, err
    assert "does not load in onnxruntime" in err
    assert not out.exists()


# --- defect 9: stale data files, modes, overwrites ------------------------------------------


def test_stale_data_file_of_the_previous_output_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    graphopt.optimize(external_digits(tmp_path / "in"), out, ["cleanup"], data=str(DIGITS_DATA))
    assert (tmp_path / "o.onnx.data").is_file()
    graphopt.optimize(DIGITS_MODEL, out, ["cleanup"], data=str(DIGITS_DATA))
    assert not (tmp_path / "o.onnx.data").exists()  # the new output is self-contained
    assert onnx.load(str(out)) is not None


def test_a_data_file_the_previous_output_did_not_use_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    foreign = tmp_path / "o.onnx.data"
    foreign.write_bytes(b"not ours")
    graphopt.optimize(DIGITS_MODEL, out, ["cleanup"], data=str(DIGITS_DATA))
    assert foreign.read_bytes() == b"not ours"


def test_overwriting_keeps_model_and_data_consistent(tmp_path: Path) -> None:
    source = external_digits(tmp_path / "in")
    out = tmp_path / "o.onnx"
    graphopt.optimize(source, out, ["cleanup"], data=str(DIGITS_DATA))
    first = sha256_of(out), sha256_of(tmp_path / "o.onnx.data")
    report = graphopt.optimize(source, out, ["fp16"], data=str(DIGITS_DATA))
    assert report.validation is not None and report.validation.passed
    assert (sha256_of(out), sha256_of(tmp_path / "o.onnx.data")) != first
    check = graphopt.optimize(out, tmp_path / "again.onnx", ["cleanup"], data=str(DIGITS_DATA))
    assert check.validation is not None and check.validation.passed  # the pair loads together


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_and_reports_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        out = tmp_path / "o.onnx"
        report = tmp_path / "r.json"
        graphopt.optimize(
            external_digits(tmp_path / "in"),
            out,
            ["cleanup"],
            data=str(DIGITS_DATA),
            report_path=report,
        )
    finally:
        os.umask(previous)
    for path in (out, tmp_path / "o.onnx.data", report):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# --- defect 9: the Python API checks its arguments up front ---------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"passes": "cleanup"}, OptionError, "list of pass names"),
        ({"passes": []}, PlanError, "no passes"),
        ({"options": {"quant": 0.9}, "passes": ["quant"]}, OptionError, "must be a mapping"),
        ({"providers": "cpu"}, OptionError, "providers must be a list"),
        ({"criteria": 0.99}, OptionError, "graphopt.Criteria"),
    ],
)
def test_python_api_rejects_misread_arguments_before_writing(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    out = tmp_path / "o.onnx"
    arguments: dict[str, object] = {"passes": ["cleanup"], "data": str(DIGITS_DATA)}
    arguments.update(kwargs)
    passes = arguments.pop("passes")
    with pytest.raises(error, match=message):
        graphopt.optimize(DIGITS_MODEL, out, passes, **arguments)  # type: ignore[arg-type]
    assert not out.exists()


def test_python_api_refuses_a_provider_onnxruntime_lacks(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: nothing to refuse")
    out = tmp_path / "o.onnx"
    with pytest.raises(InputError, match="'cuda' is not available"):
        graphopt.optimize(DIGITS_MODEL, out, ["cleanup"], providers=["cuda"])
    assert not out.exists()


def test_file_systems_without_unnamed_files_still_publish_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where O_TMPFILE is refused (NFS, older overlayfs), a hidden temporary name is used, and
    removed: the published files are the same and nothing else is left."""
    import errno

    import graphopt.ir.files as files

    real_open = os.open

    def no_unnamed_files(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "unnamed files are not supported")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    files.write_atomic_text(out_dir / "r.json", "{}\n")
    staged = tmp_path / "staged.onnx"
    staged.write_bytes(b"model bytes")
    monkeypatch.setattr(files.os, "open", no_unnamed_files)
    monkeypatch.setattr(files, "_same_file_system", lambda path, folder: False)  # copy, not rename
    files.write_atomic_text(out_dir / "r.json", '{"new": true}\n')
    files.publish(staged, out_dir / "m.onnx")
    assert (out_dir / "r.json").read_text() == '{"new": true}\n'
    assert (out_dir / "m.onnx").read_bytes() == b"model bytes"
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.onnx", "r.json"]


# --- review findings: roles of files, bodies, publishing under signals ----------------------


def test_output_data_file_that_is_the_inputs_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """a.onnx keeps its weights in b.onnx.data: writing b.onnx would replace them."""
    folder = tmp_path / "sd"
    folder.mkdir()
    source = folder / "a.onnx"
    onnx.save_model(
        onnx.load(str(DIGITS_MODEL)),
        str(source),
        save_as_external_data=True,
        location="b.onnx.data",
        size_threshold=0,
    )
    before = folder_digest(folder)
    for out in (folder / "b.onnx", folder / "b.onnx.data"):
        code, _, err = run_cli(_optimize_args(source, out, "--passes", "cleanup"), capsys)
        assert code == 2 and "the input's data file b.onnx.data" in err, err
    assert folder_digest(folder) == before


@pytest.mark.parametrize("which", ["input", "output", "input data"])
def test_report_path_that_is_a_model_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    source = external_digits(tmp_path / "in")
    out = tmp_path / "o.onnx"
    report = {"input": source, "output": out, "input data": tmp_path / "in" / "ext.onnx.data"}
    before = folder_digest(source.parent)
    args = _optimize_args(source, out, "--passes", "cleanup", "--report", str(report[which]))
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "the report" in err, err
    assert folder_digest(source.parent) == before
    assert not out.exists()


def test_check_reports_cannot_overwrite_the_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    candidate = tmp_path / "cand.onnx"
    candidate.write_bytes(DIGITS_MODEL.read_bytes())
    for flag in ("--json", "--junit"):
        code, _, err = run_cli(
            ["check", str(DIGITS_MODEL), str(candidate), flag, str(candidate)], capsys
        )
        assert code == 2 and "is the candidate model" in err, err
    assert candidate.read_bytes() == DIGITS_MODEL.read_bytes()


def _if_model_with_external_body_weights(folder: Path) -> Path:
    """y = If(c, x @ Wt, x @ We) with 512×512 weights (1 MiB each) stored externally."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    width = 512

    def branch(name: str) -> onnx.GraphProto:
        weight = numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"W{name}"
        )
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"W{name}"], [f"y{name}"], name=f"mm_{name}")],
            name,
            [],
            [helper.make_tensor_value_info(f"y{name}", TensorProto.FLOAT, ["n", width])],
            [weight],
        )

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
        "branchy",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True)
    path = folder / "branchy.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="branchy.data", size_threshold=0
    )
    return path


@pytest.mark.parametrize("passes", ["cleanup", "lowrank", "sparsify"])
def test_external_and_spilled_weights_in_bodies_from_another_folder(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    passes: str,
) -> None:
    """Body weights stored externally (and, after lowrank/sparsify, spilled to the temporary
    folder) used to send onnx's checker to the working folder: exit 2 on load, exit 3 after
    a pass, unless run from the model's own folder."""
    source = _if_model_with_external_body_weights(tmp_path / "store")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out.onnx"
    args = ["optimize", str(source), str(out), "--passes", passes, "--min-cosine", "0"]
    with read_only(source.parent):
        code, stdout, err = run_cli([*args, "--min-snr", "-100"], capsys)
    assert code == 0, err + stdout
    assert list(elsewhere.iterdir()) == []


def test_interrupt_while_publishing_takes_effect_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT between renaming OUT.data and OUT is held until both are in place: the run
    exits 130 with the complete new pair (and its report), never a mixed one."""
    import signal

    import graphopt.ir.files as files

    source = external_digits(tmp_path / "in")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    graphopt.optimize(source, out, ["cleanup"], data=str(DIGITS_DATA))
    commit = files._PendingFile.commit

    def interrupted_commit(self: files._PendingFile) -> None:
        commit(self)
        if self.target.name.endswith(".data"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(files._PendingFile, "commit", interrupted_commit)
    args = _optimize_args(source, out, "--passes", "fp16", "--report", str(report))
    code, _, _ = run_cli(args, capsys)
    assert code == 130
    assert json.loads(report.read_text())["plan"] == ["fp16"]
    monkeypatch.undo()
    fresh = graphopt.optimize(out, tmp_path / "again.onnx", ["cleanup"], data=str(DIGITS_DATA))
    assert fresh.validation is not None and fresh.validation.passed  # the pair loads together
    assert onnx.load(str(out), load_external_data=False).graph.initializer[0].data_type == (
        onnx.TensorProto.FLOAT16
    )


def test_full_temporary_folder_during_validation_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import graphopt.check.validate as validate

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npy"))

    monkeypatch.setattr(validate._ReferenceOutputs, "save", full)
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(_optimize_args(DIGITS_MODEL, out, "--passes", "cleanup"), capsys)
    assert code == 2 and "No space left on device" in err and "internal error" not in err
    assert not out.exists()
