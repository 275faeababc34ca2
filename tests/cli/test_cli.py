"""The CLI end to end: the bundled real model, exit codes, one-line errors, no stray files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from ..conftest import DIGITS_DATA, DIGITS_MODEL, REPO_ROOT, run_cli, sha256_of


def test_optimize_bundled_model_prints_plan_stats_and_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sha256_of(DIGITS_MODEL)
    out = tmp_path / "digits_opt.onnx"
    report = tmp_path / "report.json"
    code, stdout, _ = run_cli(
        [
            "optimize",
            str(DIGITS_MODEL),
            str(out),
            "--passes",
            "cleanup",
            "--calib-data",
            str(DIGITS_DATA),
            "--report",
            str(report),
        ],
        capsys,
    )
    assert code == 0, stdout
    assert "plan: cleanup" in stdout
    assert "[1/1] cleanup" in stdout
    assert "validation: PASSED" in stdout
    assert "logits" in stdout
    assert sha256_of(DIGITS_MODEL) == before, "the input model must never change"
    data = json.loads(report.read_text())
    assert data["passed"] and data["plan"] == ["cleanup"]
    assert data["validation"]["comparisons"][0]["top1"] == 1.0
    assert not data["synthetic_data"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_optimize_is_byte_identical_across_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    for name in ("a.onnx", "b.onnx"):
        out = tmp_path / name
        code, _, _ = run_cli(
            ["optimize", str(DIGITS_MODEL), str(out), "--passes", "cleanup", "--no-validate"],
            capsys,
        )
        assert code == 0
        outputs.append(sha256_of(out))
    assert outputs[0] == outputs[1]


def test_synthetic_data_warns_loudly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run_cli(
        ["optimize", str(DIGITS_MODEL), str(tmp_path / "o.onnx"), "--passes", "cleanup"], capsys
    )
    assert code == 0
    assert "SYNTHETIC" in stdout and "WARNING" in stderr


def test_failed_budget_exits_1_and_keeps_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], installed_plugin: str
) -> None:
    out = tmp_path / "o.onnx"
    args = [
        "optimize",
        str(DIGITS_MODEL),
        str(out),
        "--passes",
        "noise,cleanup",
        "--calib-data",
        str(DIGITS_DATA),
    ]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 1, stdout
    assert "plan: cleanup → noise" in stdout
    assert "validation: FAILED" in stdout and "cosine" in stdout
    assert out.exists()
    code, stdout, _ = run_cli([*args, "-o", "noise.scale=0.001"], capsys)
    assert code == 0, stdout
    assert "validation: PASSED" in stdout


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00garbage\xff" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(DIGITS_MODEL.read_bytes()[:5000])
    wrong_data = tmp_path / "wrong.npz"
    np.savez(wrong_data, pixels=np.zeros((2, 1, 8, 8), np.float32))
    out = str(tmp_path / "out.onnx")
    model = str(DIGITS_MODEL)
    return {
        "not-onnx": (["optimize", str(garbage), out, "--passes", "cleanup"], "not"),
        "truncated": (["optimize", str(truncated), out, "--passes", "cleanup"], "truncated"),
        "missing": (
            ["optimize", str(tmp_path / "nope.onnx"), out, "--passes", "cleanup"],
            "no such file",
        ),
        "unknown-pass": (["optimize", model, out, "--passes", "magic"], "unknown pass 'magic'"),
        "bad-option": (
            ["optimize", model, out, "--passes", "cleanup", "-o", "cleanup.fold_constants=maybe"],
            "cleanup.fold_constants",
        ),
        "unknown-option": (
            ["optimize", model, out, "--passes", "cleanup", "-o", "cleanup.nope=1"],
            "has no option 'nope'",
        ),
        "option-for-unrequested-pass": (
            ["optimize", model, out, "--passes", "cleanup", "-o", "quant.bits=8"],
            "not in --passes",
        ),
        "wrong-data": (
            ["optimize", model, out, "--passes", "cleanup", "--calib-data", str(wrong_data)],
            "no data for model input 'image'",
        ),
        "same-path": (["optimize", model, model, "--passes", "cleanup"], "is the input model"),
        "no-folder": (
            ["optimize", model, str(tmp_path / "no" / "o.onnx"), "--passes", "cleanup"],
            "does not exist",
        ),
        "no-passes": (["optimize", model, out], "no passes given"),
        "cuda-absent-or-unknown": (
            ["optimize", model, out, "--passes", "cleanup", "--providers", "tpu"],
            "unknown execution provider",
        ),
        "bad-flag": (["optimize", model, out, "--frobnicate"], "No such option"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not-onnx",
        "truncated",
        "missing",
        "unknown-pass",
        "bad-option",
        "unknown-option",
        "option-for-unrequested-pass",
        "wrong-data",
        "same-path",
        "no-folder",
        "no-passes",
        "cuda-absent-or-unknown",
        "bad-flag",
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, expected = _bad_inputs(tmp_path)[case]
    before = sha256_of(DIGITS_MODEL)
    code, _, stderr = run_cli(args, capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("graphopt: error: ")
    assert expected in lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "out.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert sha256_of(DIGITS_MODEL) == before


def test_cuda_without_gpu_is_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    code, _, stderr = run_cli(
        [
            "optimize",
            str(DIGITS_MODEL),
            str(tmp_path / "o.onnx"),
            "--passes",
            "cleanup",
            "--providers",
            "cpu,cuda",
        ],
        capsys,
    )
    assert code == 2
    assert "execution provider 'cuda' is not available" in stderr
    assert not (tmp_path / "o.onnx").exists()


def test_recipe_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes: [cleanup]\noptions:\n  cleanup:\n    fold_shapes: false\n")
    code, stdout, _ = run_cli(
        [
            "optimize",
            str(DIGITS_MODEL),
            str(tmp_path / "o.onnx"),
            "--recipe",
            str(recipe),
            "--no-validate",
        ],
        capsys,
    )
    assert code == 0 and "plan: cleanup" in stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"passes": ["cleanup"], "stages": []}))
    code, _, stderr = run_cli(
        ["optimize", str(DIGITS_MODEL), str(tmp_path / "p.onnx"), "--recipe", str(bad)], capsys
    )
    assert code == 2 and "unknown key 'stages'" in stderr


def test_passes_lists_options_from_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(["passes"], capsys)
    assert code == 0
    assert "cleanup (exact)" in stdout
    assert "-o cleanup.max_growth_bytes=0 " in stdout


def test_inspect(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_cli(["inspect", str(DIGITS_MODEL), "--json"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["op_histogram"]["Conv"] == 2
    assert summary["parameters"] > 10_000
    assert summary["flops"]["Conv"] > 0
    assert summary["opsets"] == {"ai.onnx": 17}
    code, stdout, _ = run_cli(["inspect", str(DIGITS_MODEL)], capsys)
    assert code == 0 and "FLOPs" in stdout and "parameters" in stdout


def test_python_dash_m_and_debug_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "graphopt", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0 and "graphopt" in result.stdout
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"junk")
    result = subprocess.run(
        [sys.executable, "-m", "graphopt", "--debug", "inspect", str(garbage)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_cli_leaves_the_callers_logging_as_it_was(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from onnx_graphsurgeon.logger import G_LOGGER

    loggers = [logging.getLogger(name) for name in ("graphopt", "passes")]
    before = [(list(item.handlers), item.level, item.propagate) for item in loggers]
    severity = G_LOGGER.severity
    assert run_cli(["-v", "passes"], capsys)[0] == 0
    assert [(list(item.handlers), item.level, item.propagate) for item in loggers] == before
    assert G_LOGGER.severity == severity


def test_sigterm_unwinds_and_exits_143(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real SIGTERM during validation (a CI timeout, ``kill``) unwinds through click, exits
    143 (not 2, which means a usage error), leaves no output, and the handler is put back."""
    import os
    import signal
    import time

    import graphopt.cli.commands as cli_module
    import graphopt.pipeline as pipeline

    def killed(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(pipeline, "compare_models", killed)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "o.onnx"
    args = ["optimize", str(DIGITS_MODEL), str(out), "--passes", "cleanup"]
    started = time.perf_counter()
    assert cli_module.main([*args, "--calib-data", str(DIGITS_DATA)]) == 143
    assert time.perf_counter() - started < 5
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is before


# --- exit codes and the logging flags on every subcommand (issue 15, item 6) ---------------------


def _subcommands(tmp_path: Path) -> dict[str, list[str]]:
    model = str(DIGITS_MODEL)
    return {
        "optimize": ["optimize", model, str(tmp_path / "o.onnx"), "--passes", "cleanup"],
        "check": ["check", model, model, "--exact", "--data", str(DIGITS_DATA)],
        "passes": ["passes"],
        "inspect": ["inspect", model],
    }


@pytest.mark.parametrize("command", ["optimize", "check", "passes", "inspect"])
@pytest.mark.parametrize("flag", ["--debug", "-v", "-vv", "--verbose"])
def test_debug_and_verbose_are_accepted_after_every_subcommand(
    command: str, flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The internal-error message points at --debug; it must exist where users type it."""
    args = _subcommands(tmp_path)[command]
    code, stdout, stderr = run_cli([*args, flag], capsys)
    assert code == 0, stdout + stderr
    assert "No such option" not in stderr


def test_tune_accepts_debug_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["tune", str(DIGITS_MODEL), "--calib-data", str(DIGITS_DATA), "--budget", "0"]
    code, _, stderr = run_cli([*args, "--debug"], capsys)
    assert code == 2 and "--budget" in stderr and "No such option" not in stderr


def test_verbose_after_the_subcommand_sets_the_same_level_as_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:

    args = _subcommands(tmp_path)["optimize"]
    _, _, before = run_cli(["-v", *args], capsys)
    _, _, after = run_cli([*args, "-v"], capsys)
    _, _, quiet = run_cli(args, capsys)
    assert "INFO graphopt" in before and "INFO graphopt" in after
    assert "INFO" not in quiet
    import graphopt.cli.logs as logs_module

    levels: list[tuple[int, bool]] = []
    setup = logs_module.setup_logging

    def recorded(verbose: int, debug: bool) -> None:
        levels.append((verbose, debug))
        setup(verbose, debug)

    monkeypatch.setattr(logs_module, "setup_logging", recorded)
    assert run_cli(["-v", "passes", "-v", "--debug"], capsys)[0] == 0
    assert levels[-1] == (2, True), "counts add up across the group and the subcommand"


def test_an_unexpected_exception_exits_3_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import graphopt.cli.commands as cli_module

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(cli_module, "optimize", broken)
    args = _subcommands(tmp_path)["optimize"]
    code, _, stderr = run_cli(args, capsys)
    assert code == cli_module.EXIT_BUG == 3
    assert stderr == (
        "graphopt: internal error: ZeroDivisionError: boom — please report it; "
        "rerun with --debug for the traceback\n"
    )
    code, _, stderr = run_cli([*args, "--debug"], capsys)
    assert code == 3 and "Traceback" in stderr and "ZeroDivisionError" in stderr


def test_debug_after_the_subcommand_shows_the_traceback_of_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"junk")
    code, _, stderr = run_cli(["inspect", str(garbage), "--debug"], capsys)
    assert code == 2 and "Traceback" in stderr


def test_a_pass_that_crashes_is_a_bug_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15.6: an exception inside a pass is graphopt's bug, not the user's input (it was
    wrapped as PassError, a GraphoptError, and exited 2)."""
    from passes.cleanup import CleanupPass

    def broken(self: object, model: object, context: object) -> None:
        raise NameError("name 'body_labels' is not defined")

    monkeypatch.setattr(CleanupPass, "call", broken)
    args = _subcommands(tmp_path)["optimize"]
    code, _, stderr = run_cli(args, capsys)
    assert code == 3
    last = stderr.strip().splitlines()[-1]  # after the synthetic-data warning
    assert last.startswith("graphopt: internal error: pass 'cleanup' failed after []: NameError")
    assert "please report it" in last and "Traceback" not in stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(("signal_name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_while_the_cli_is_imported_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    signal_name: str,
    code: int,
) -> None:
    """The command's entry point catches signals before importing onnx and ONNX Runtime (a
    few tenths of a second), which used to end in a traceback and exit 1."""
    import os
    import signal
    import types

    import graphopt.__main__ as entry

    signum = getattr(signal, signal_name)
    slow_cli = types.ModuleType("graphopt.cli.commands")

    def importing(name: str) -> object:  # `from graphopt.cli.commands import main` looks `main` up
        os.kill(os.getpid(), signum)
        raise ImportError("initialization failed")  # as ONNX Runtime's extension reports it

    slow_cli.__getattr__ = importing  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "graphopt.cli.commands", slow_cli)
    before = signal.getsignal(signum)
    assert entry.main() == code
    assert capsys.readouterr().err == f"graphopt: interrupted during start-up ({signal_name})\n"
    assert signal.getsignal(signum) is before


def test_keep_order_runs_passes_as_given_or_names_the_broken_relation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 17.4: a given order is checked against the declared relations, not re-sorted."""
    out = tmp_path / "o.onnx"
    base = ["optimize", str(DIGITS_MODEL), str(out), "--calib-data", str(DIGITS_DATA)]
    code, stdout, _ = run_cli([*base, "--passes", "cleanup,fp16", "--keep-order"], capsys)
    assert code == 0 and "plan (as given): cleanup → fp16" in stdout
    code, _, err = run_cli([*base, "--passes", "fp16,cleanup", "--keep-order"], capsys)
    assert code == 2 and "cleanup" in err and "fp16" in err and "before" in err, err
    code, stdout, _ = run_cli([*base, "--passes", "fp16,cleanup"], capsys)
    assert code == 0 and "plan: cleanup → fp16" in stdout  # planned: sorted as declared
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [fp16, cleanup]\norder: given\n")
    code, _, err = run_cli(
        [*base[:3], "--calib-data", str(DIGITS_DATA), "--recipe", str(recipe)], capsys
    )
    assert code == 2 and "before" in err
    recipe.write_text("passes: [cleanup]\norder: sideways\n")
    code, _, err = run_cli([*base, "--recipe", str(recipe)], capsys)
    assert code == 2 and "'order' must be one of planned, given" in err
