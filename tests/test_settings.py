"""Issue 17.5: runtime settings in one typed object, from the environment, flags and the API.

Checked on real sessions: the level and thread count a setting asks for are read back from the
ONNX Runtime session's own options, and folders from where the run really staged its files.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt.check.latency as latency
import graphopt.check.validate as validate
import graphopt.data.calibration as calibration
import graphopt.pipeline as pipeline
from graphopt.check.gate import run_gate
from graphopt.data.calibration import StatRequest, collect, gram_budget, output_budget
from graphopt.data.feeds import input_specs, open_data
from graphopt.errors import InputError, OptionError
from graphopt.ir.model import load_model, model_from_proto
from graphopt.ir.normalize import normalize
from graphopt.ir.ort import _ORT_LEVELS, make_session
from graphopt.passkit.api import PassContext
from graphopt.settings import ENVIRONMENT, ORT_LEVELS, Settings, parse_bytes

from .conftest import (
    DIGITS_DATA,
    DIGITS_MODEL,
    REPO_ROOT,
    float_input,
    make_model,
    run_cli,
    weight,
)

LEVEL = ort.GraphOptimizationLevel
DIGITS_FEED = {"image": np.load(DIGITS_DATA)["image"][:4]}


@pytest.fixture(autouse=True)
def _no_graphopt_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own GRAPHOPT_* variables must not leak into these tests."""
    for variable in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)


@contextmanager
def recorded_sessions(monkeypatch: pytest.MonkeyPatch, module: Any) -> Iterator[list[Any]]:
    """The real sessions ``module`` makes, kept to read their options back."""
    made: list[Any] = []
    real = module.make_session

    def recording(*args: Any, **kwargs: Any) -> Any:
        session = real(*args, **kwargs)
        made.append(session.get_session_options())
        return session

    monkeypatch.setattr(module, "make_session", recording)
    yield made


def _digits_feeds():  # type: ignore[no-untyped-def]
    return open_data(DIGITS_DATA, input_specs(load_model(DIGITS_MODEL).graph), batch_size=8)


# --- the object: defaults, checks -------------------------------------------------------------


def test_defaults_are_todays_behaviour() -> None:
    settings = Settings()
    assert settings.tmp_dir is None and settings.threads == 0
    assert (settings.validation_ort_level, settings.latency_ort_level) == ("disable", "all")
    assert settings.calibration_output_bytes is None and settings.gram_budget_bytes is None
    assert output_budget(settings) == calibration.OUTPUT_BUDGET_BYTES == 512 << 20
    model = model_from_proto(_mlp(64))
    assert gram_budget(model, settings) == gram_budget(model) == 256 << 20
    assert PassContext().settings == settings


def test_every_field_is_documented_and_frozen() -> None:
    source = (REPO_ROOT / "graphopt" / "settings.py").read_text()
    for item in dataclasses.fields(Settings):
        assert re.search(rf"\n    {item.name}: .*\n    \"\"\"", source), item.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().threads = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"threads": -1}, "Settings.threads"),
        ({"threads": 1.5}, "Settings.threads"),
        ({"threads": True}, "Settings.threads"),
        ({"validation_ort_level": "fast"}, "Settings.validation_ort_level"),
        ({"latency_ort_level": True}, "Settings.latency_ort_level"),
        ({"calibration_output_bytes": 0}, "Settings.calibration_output_bytes"),
        ({"gram_budget_bytes": "1G"}, "Settings.gram_budget_bytes"),
        ({"tmp_dir": 3}, "Settings.tmp_dir"),
    ],
)
def test_bad_values_are_option_errors_naming_the_field(values: dict[str, Any], named: str) -> None:
    with pytest.raises(OptionError, match=re.escape(named)) as caught:
        Settings(**values)
    assert isinstance(caught.value, InputError) and "\n" not in str(caught.value)


def test_tmp_dir_is_made_a_path(tmp_path: Path) -> None:
    assert Settings(tmp_dir=str(tmp_path)).tmp_dir == tmp_path


# --- the environment ----------------------------------------------------------------------------


def test_from_env_reads_every_variable(tmp_path: Path) -> None:
    environ = {
        "GRAPHOPT_TMPDIR": str(tmp_path),
        "GRAPHOPT_THREADS": "3",
        "GRAPHOPT_CALIBRATION_OUTPUT_BYTES": "64M",
        "GRAPHOPT_GRAM_BUDGET_BYTES": "1073741824",
        "OTHER": "x",
    }
    assert Settings.from_env(environ) == Settings(
        tmp_dir=tmp_path,
        threads=3,
        calibration_output_bytes=64 << 20,
        gram_budget_bytes=1 << 30,
    )
    assert Settings.from_env({name: " " for name in environ}) == Settings()  # empty is unset
    assert Settings.from_env({}) == Settings()


def test_from_env_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHOPT_THREADS", "2")
    assert Settings.from_env().threads == 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GRAPHOPT_THREADS", "many"),
        ("GRAPHOPT_THREADS", "-2"),
        ("GRAPHOPT_CALIBRATION_OUTPUT_BYTES", "0"),
        ("GRAPHOPT_CALIBRATION_OUTPUT_BYTES", "5 parsecs"),
        ("GRAPHOPT_GRAM_BUDGET_BYTES", "-1G"),
        ("GRAPHOPT_TMPDIR", "/no/such/folder"),
    ],
)
def test_bad_variables_are_option_errors_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(OptionError, match=variable) as caught:
        Settings.from_env({variable: value})
    assert "\n" not in str(caught.value)


def test_tmpdir_variable_must_be_a_folder(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(OptionError, match="GRAPHOPT_TMPDIR=.*is not a folder"):
        Settings.from_env({"GRAPHOPT_TMPDIR": str(file)})


@pytest.mark.parametrize(
    ("text", "count"),
    [("512", 512), ("512M", 512 << 20), ("512mib", 512 << 20), ("1G", 1 << 30), ("2 KB", 2048)],
)
def test_byte_sizes(text: str, count: int) -> None:
    assert parse_bytes(text, "X") == count


# --- sessions: levels and threads reach ONNX Runtime ---------------------------------------------


def test_make_session_takes_every_level() -> None:
    assert set(_ORT_LEVELS) == set(ORT_LEVELS)
    expected = {
        "disable": LEVEL.ORT_DISABLE_ALL,
        "basic": LEVEL.ORT_ENABLE_BASIC,
        "extended": LEVEL.ORT_ENABLE_EXTENDED,
        "all": LEVEL.ORT_ENABLE_ALL,
        True: LEVEL.ORT_ENABLE_ALL,
        False: LEVEL.ORT_DISABLE_ALL,
    }
    for optimize, level in expected.items():
        session = make_session(DIGITS_MODEL, optimize=optimize)
        assert session.get_session_options().graph_optimization_level == level
    with pytest.raises(OptionError, match="'fast'"):
        make_session(DIGITS_MODEL, optimize="fast")  # type: ignore[arg-type]


def test_validation_sessions_follow_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    with recorded_sessions(monkeypatch, validate) as made:
        validate.compare_models(DIGITS_MODEL, DIGITS_MODEL, _digits_feeds(), settings=Settings())
    assert [o.graph_optimization_level for o in made] == [LEVEL.ORT_DISABLE_ALL] * 2
    assert [o.intra_op_num_threads for o in made] == [0, 0]  # ONNX Runtime's default
    made.clear()
    settings = Settings(threads=1, validation_ort_level="extended")
    report = validate.compare_models(DIGITS_MODEL, DIGITS_MODEL, _digits_feeds(), settings=settings)
    assert report.passed
    assert [o.graph_optimization_level for o in made] == [LEVEL.ORT_ENABLE_EXTENDED] * 2
    assert [o.intra_op_num_threads for o in made] == [1, 1]


def test_validation_reads_the_environment_without_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRAPHOPT_THREADS", "1")
    with recorded_sessions(monkeypatch, validate) as made:
        validate.compare_models(DIGITS_MODEL, DIGITS_MODEL, _digits_feeds())
    assert [o.intra_op_num_threads for o in made] == [1, 1]


def test_latency_sessions_follow_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    with recorded_sessions(monkeypatch, latency) as made:
        latency.measure_latency(DIGITS_MODEL, DIGITS_MODEL, DIGITS_FEED, runs=2, warmup=0)
        settings = Settings(threads=2, latency_ort_level="basic")
        latency.measure_latency(
            DIGITS_MODEL, DIGITS_MODEL, DIGITS_FEED, runs=2, warmup=0, settings=settings
        )
        latency.measure_latency(
            DIGITS_MODEL, DIGITS_MODEL, DIGITS_FEED, runs=2, warmup=0, settings=settings, threads=1
        )
    assert [o.graph_optimization_level for o in made] == [LEVEL.ORT_ENABLE_ALL] * 2 + [
        LEVEL.ORT_ENABLE_BASIC
    ] * 4
    assert [o.intra_op_num_threads for o in made] == [0, 0, 2, 2, 1, 1]


def test_gate_hands_its_settings_to_validation_and_latency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(threads=1, validation_ort_level="all", latency_ort_level="disable")
    with (
        recorded_sessions(monkeypatch, validate) as checked,
        recorded_sessions(monkeypatch, latency) as timed,
    ):
        report = run_gate(
            DIGITS_MODEL,
            DIGITS_MODEL,
            _digits_feeds(),
            providers=["cpu"],
            criteria=validate.Criteria(),
            max_latency_ratio=100.0,
            latency_runs=2,
            settings=settings,
        )
    assert report.passed and report.latency is not None
    assert [o.graph_optimization_level for o in checked] == [LEVEL.ORT_ENABLE_ALL] * 2
    assert [o.graph_optimization_level for o in timed] == [LEVEL.ORT_DISABLE_ALL] * 2
    assert {o.intra_op_num_threads for o in checked + timed} == {1}


# --- calibration budgets ---------------------------------------------------------------------


def _mlp(width: int) -> onnx.ModelProto:
    return make_model(
        [
            onnx.helper.make_node("MatMul", ["x", "w"], ["h"]),
            onnx.helper.make_node("Relu", ["h"], ["y"]),
        ],
        [float_input("x", ["n", width])],
        [float_input("y", ["n", width])],
        [weight("w", (width, width))],
    )


def test_calibration_follows_the_settings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = model_from_proto(_mlp(64))
    normalize(model)
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    requests = [StatRequest("h", gram=True), StatRequest("y")]
    whole = collect(model, [{"x": x}], requests)  # type: ignore[arg-type]
    settings = Settings(threads=1, calibration_output_bytes=2 * 64 * 4 * 4)  # four samples a run
    with (
        recorded_sessions(monkeypatch, calibration) as made,
        caplog.at_level(logging.INFO, "graphopt.data.calibration"),
    ):
        split = collect(model, [{"x": x}], requests, settings=settings)  # type: ignore[arg-type]
    assert "running 4 samples at a time" in caplog.text
    assert [o.intra_op_num_threads for o in made] == [1]
    assert [o.graph_optimization_level for o in made] == [LEVEL.ORT_DISABLE_ALL]
    np.testing.assert_allclose(split["h"].gram, whole["h"].gram, rtol=1e-6)
    assert gram_budget(model, Settings(gram_budget_bytes=4096)) == 4096


# --- the pipeline and the CLI ----------------------------------------------------------------


@contextmanager
def staged_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The folders ``optimize`` really staged its output in."""
    staged: list[Path] = []
    real = pipeline.staging_folder

    def spy(folder: Path):  # type: ignore[no-untyped-def]
        staged.append(folder)
        return real(folder)

    monkeypatch.setattr(pipeline, "staging_folder", spy)
    yield staged


def test_optimize_carries_settings_to_passes_and_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Settings] = []
    real_run = pipeline.PassManager.run

    def run(self, model, context):  # type: ignore[no-untyped-def]
        seen.append(context.settings)
        return real_run(self, model, context)

    monkeypatch.setattr(pipeline.PassManager, "run", run)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    settings = Settings(tmp_dir=scratch, threads=1)
    out = tmp_path / "o.onnx"
    with recorded_sessions(monkeypatch, validate) as made, staged_in(monkeypatch) as staged:
        report = pipeline.optimize(
            DIGITS_MODEL, out, ["cleanup"], data=str(DIGITS_DATA), settings=settings
        )
    assert report.passed and out.exists()
    assert seen == [settings] and staged == [scratch]
    assert [o.intra_op_num_threads for o in made] == [1, 1]


def test_optimize_tmp_dir_beats_settings_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = {name: tmp_path / name for name in ("env", "settings", "argument")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.setenv("GRAPHOPT_TMPDIR", str(folders["env"]))
    args = (DIGITS_MODEL, tmp_path / "o.onnx", ["cleanup"])
    with staged_in(monkeypatch) as staged:
        pipeline.optimize(*args, validate=False)
        pipeline.optimize(*args, validate=False, settings=Settings(tmp_dir=folders["settings"]))
        pipeline.optimize(
            *args,
            validate=False,
            settings=Settings(tmp_dir=folders["settings"]),
            tmp_dir=folders["argument"],
        )
    assert staged == [folders["env"], folders["settings"], folders["argument"]]
    with pytest.raises(OptionError, match="settings must be"):
        pipeline.optimize(*args, settings={"threads": 1})  # type: ignore[arg-type]


def _optimize(out: Path, *extra: str) -> list[str]:
    return ["optimize", str(DIGITS_MODEL), str(out), "--passes", "cleanup", *extra]


def test_cli_threads_and_level_reach_validation_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRAPHOPT_THREADS", "2")
    with recorded_sessions(monkeypatch, validate) as made:
        code, _, err = run_cli(_optimize(tmp_path / "a.onnx"), capsys)
        assert code == 0, err
        code, _, err = run_cli(
            _optimize(tmp_path / "b.onnx", "--threads", "1", "--validation-ort-level", "all"),
            capsys,
        )
        assert code == 0, err
    assert [o.intra_op_num_threads for o in made] == [2, 2, 1, 1]  # the flag beats the variable
    assert [o.graph_optimization_level for o in made] == [LEVEL.ORT_DISABLE_ALL] * 2 + [
        LEVEL.ORT_ENABLE_ALL
    ] * 2


def test_cli_tmp_dir_flag_beats_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env, flag = tmp_path / "env", tmp_path / "flag"
    env.mkdir()
    flag.mkdir()
    monkeypatch.setenv("GRAPHOPT_TMPDIR", str(env))
    with staged_in(monkeypatch) as staged:
        assert run_cli(_optimize(tmp_path / "a.onnx", "--no-validate"), capsys)[0] == 0
        args = _optimize(tmp_path / "b.onnx", "--no-validate", "--tmp-dir", str(flag))
        assert run_cli(args, capsys)[0] == 0
    assert staged == [env, flag]


def test_cli_check_levels_and_threads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["check", str(DIGITS_MODEL), str(DIGITS_MODEL), "--data", str(DIGITS_DATA)]
    args += ["--max-latency-ratio", "100", "--latency-runs", "2", "--threads", "1"]
    args += ["--latency-ort-level", "basic", "--validation-ort-level", "extended"]
    with (
        recorded_sessions(monkeypatch, validate) as checked,
        recorded_sessions(monkeypatch, latency) as timed,
    ):
        code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert [o.graph_optimization_level for o in checked] == [LEVEL.ORT_ENABLE_EXTENDED] * 2
    assert [o.graph_optimization_level for o in timed] == [LEVEL.ORT_ENABLE_BASIC] * 2
    assert {o.intra_op_num_threads for o in checked + timed} == {1}


@pytest.mark.parametrize(
    ("command", "variable", "value", "named"),
    [
        ("optimize", "GRAPHOPT_THREADS", "lots", "GRAPHOPT_THREADS"),
        ("optimize", "GRAPHOPT_CALIBRATION_OUTPUT_BYTES", "big", "GRAPHOPT_CALIBRATION_OUTPUT"),
        ("optimize", "GRAPHOPT_TMPDIR", "/no/such/folder", "GRAPHOPT_TMPDIR"),
        ("check", "GRAPHOPT_GRAM_BUDGET_BYTES", "0", "GRAPHOPT_GRAM_BUDGET_BYTES"),
        ("tune", "GRAPHOPT_THREADS", "-1", "GRAPHOPT_THREADS"),
        ("optimize", None, "--threads=-1", "'--threads'"),
        ("check", None, "--validation-ort-level=fast", "'--validation-ort-level'"),
        ("check", None, "--latency-ort-level=fast", "'--latency-ort-level'"),
    ],
)
def test_cli_bad_settings_are_exit_2_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    variable: str | None,
    value: str,
    named: str,
) -> None:
    out = tmp_path / "o.onnx"
    args = {
        "optimize": _optimize(out),
        "check": ["check", str(DIGITS_MODEL), str(DIGITS_MODEL)],
        "tune": ["tune", str(DIGITS_MODEL), "--out-dir", str(tmp_path / "tune")],
    }[command]
    if variable is None:
        args.append(value)
    else:
        monkeypatch.setenv(variable, value)
    code, stdout, err = run_cli(args, capsys)
    assert code == 2 and named in err
    assert err.count("\n") == 1 and not stdout
    assert not out.exists() and not (tmp_path / "tune").exists()


# --- the README table ----------------------------------------------------------------------


def test_readme_table_lists_every_setting() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = {
        cells[0].strip("` "): cells
        for line in section.splitlines()
        if line.startswith("| `")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert set(rows) == {item.name for item in dataclasses.fields(Settings)}
    for name, cells in rows.items():
        assert cells[2].strip("`") == ENVIRONMENT.get(name, "—"), name


def test_a_flag_overrides_a_bad_variable_instead_of_failing_on_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule 4: flags beat variables, so a variable a flag overrides is not even read."""
    from graphopt.cli.commands import main

    monkeypatch.setenv("GRAPHOPT_THREADS", "abc")
    monkeypatch.setenv("GRAPHOPT_TMPDIR", str(tmp_path / "nowhere"))
    out = tmp_path / "o.onnx"
    args = ["optimize", str(DIGITS_MODEL), str(out), "--passes", "cleanup"]
    code = main(
        [*args, "--calib-data", str(DIGITS_DATA), "--threads", "1", "--tmp-dir", str(tmp_path)]
    )
    assert code == 0, capsys.readouterr().err
    assert Settings.from_env(given={"threads", "tmp_dir"}) == Settings()
    with pytest.raises(OptionError, match="GRAPHOPT_THREADS"):
        Settings.from_env(given={"tmp_dir"})


def test_default_settings_leave_tune_cache_keys_as_they_were() -> None:
    """Results cached before the settings existed (or with the defaults) stay valid."""
    from graphopt.tuning.search import _non_default

    assert _non_default(Settings(), "validation_ort_level", "latency_ort_level", "threads") == {}
    changed = Settings(threads=2, validation_ort_level="all")
    assert _non_default(changed, "validation_ort_level", "threads") == {
        "validation_ort_level": "all",
        "threads": 2,
    }
