"""``graphopt tune``: fronts, the search, the cache and journal, outputs, CLI errors, executors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.tuning.cache import Evaluation, LatencyRecord, TuneCache
from graphopt.tuning.executor import (
    EvaluationTask,
    LocalProcessExecutor,
    SerialExecutor,
    default_workers,
)
from graphopt.tuning.plot import PlotPoint, plot_front
from graphopt.tuning.search import (
    Candidate,
    Setting,
    Trial,
    TuneResult,
    build_search_space,
    choose,
    combinations,
    front_of,
    pareto_indices,
    sensitivity_order,
    tune,
)

from ..conftest import relu_mlp, run_cli, sha256_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIXED = {"quant": {"min_macs": 0}, "lowrank": {"min_size": 0}}
"""The tiny test layers are below the passes' default size rules."""
FIXED_FLAGS = ["-o", "quant.min_macs=0", "-o", "lowrank.min_size=0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 64→256→32 ReLU MLP with seeded calibration and (disjoint) validation data."""
    folder = tmp_path_factory.mktemp("tune_inputs")
    model = folder / "mlp.onnx"
    onnx.save(relu_mlp(64, 256, 32), str(model))
    rng = np.random.default_rng(0)
    calib, val = folder / "calib.npz", folder / "val.npz"
    np.savez(calib, x=rng.standard_normal((64, 64)).astype(np.float32))
    np.savez(val, x=rng.standard_normal((32, 64)).astype(np.float32))
    return {"model": model, "calib": calib, "val": val}


def _tune(tiny: dict[str, Path], out: Path, **kwargs: object) -> TuneResult:
    arguments: dict[str, object] = {
        "calib_data": tiny["calib"],
        "data": tiny["val"],
        "options": FIXED,
        "executor": SerialExecutor(),
        "latency_runs": 3,
    }
    arguments.update(kwargs)
    return tune(tiny["model"], out, **arguments)  # type: ignore[arg-type]


def _summary(result: TuneResult) -> list[tuple[str, str, float, int, str]]:
    return [
        (
            t.key,
            t.stage,
            round(t.cosine, 9),
            t.evaluation.size_bytes if t.evaluation else -1,
            t.evaluation.model_sha256 if t.evaluation else "",
        )
        for t in result.trials
    ]


# --- fronts and the choice (unit) ----------------------------------------------------------------


def _trial(
    index: int,
    cosine: float,
    size: int,
    latency: float | None = None,
    *,
    lossy: tuple[str, ...] = ("quant",),
    sha: str | None = None,
    options: dict[str, dict[str, object]] | None = None,
) -> Trial:
    candidate = Candidate(tuple(sorted(("cleanup", *lossy))), lossy, options or {})
    evaluation = Evaluation(
        key=f"k{index}",
        passes=list(candidate.passes),
        options={},
        min_cosine=cosine,
        size_bytes=size,
        model_sha256=sha or f"sha{index}",
    )
    record = None if latency is None else LatencyRecord(latency, 10.0, 10.0 * latency, 5)
    return Trial(index, "sensitivity", candidate, f"k{index}", evaluation, latency=record)


def test_pareto_indices_minimise_every_coordinate() -> None:
    vectors = [[0.01, 50], [0.02, 30], [0.03, 40], [0.01, 60], [0.02, 30], [0.0, 100]]
    # [0.03, 40] is dominated by [0.02, 30]; [0.01, 60] by [0.01, 50]; equal points both stay
    assert pareto_indices(vectors) == [0, 1, 4, 5]
    assert pareto_indices([]) == []
    assert pareto_indices([[1.0, 1.0]]) == [0]


def test_front_counts_the_original_and_identical_models_once() -> None:
    trials = [
        _trial(0, 0.999, 50),
        _trial(1, 0.99, 30),
        _trial(2, 0.98, 40),  # dominated by 1
        _trial(3, 0.9999, 120),  # larger than the original (100 bytes): dominated by it
        _trial(4, 0.99, 30, lossy=("fp16", "quant"), sha="sha1"),  # the same model as 1
        _trial(5, 0.5, 10),  # least accurate but smallest: on the front
    ]
    front = front_of(trials, lambda t: float(t.evaluation.size_bytes), 100.0)  # type: ignore[union-attr]
    assert [t.index for t in front] == [5, 1, 0]


def test_choice_by_objective_and_ties() -> None:
    trials = [
        _trial(0, 0.995, 40, 0.95),
        _trial(1, 0.991, 30, 0.90),
        _trial(2, 0.991, 30, 0.80, lossy=("fp16", "quant")),  # same size: faster wins the tie
        _trial(3, 0.95, 10, 0.50),  # below the bar
        _trial(4, 0.999, 60, 0.79),  # within 2 % of the fastest: tied, but larger
        _trial(5, 0.999, 50, 0.805),  # tied on latency with 2 and 4, smallest of the three
    ]
    assert choose(trials, "size", 0.99, 100).index == 2  # type: ignore[union-attr]
    # off the CPU, ties go to size: 2 (fp16) wins; on the CPU fp16 must be clearly faster than
    # the best candidate without it (0.79), so 5 (the smallest of the tied rest) wins
    assert choose(trials, "latency", 0.99, 100, latency_provider="cuda").index == 2  # type: ignore[union-attr]
    assert choose(trials, "latency", 0.99, 100).index == 5  # type: ignore[union-attr]
    assert choose(trials[:2], "latency", 0.99, 100).index == 1  # type: ignore[union-attr]
    assert choose(trials, "size", 0.9999, 100) is None
    # fewer lossy passes, then fewer options break exact ties
    twins = [
        _trial(0, 0.995, 30, None, options={"quant": {"calibrator": "mse"}}),
        _trial(1, 0.995, 30, None),
    ]
    assert choose(twins, "size", 0.99, 100).index == 1  # type: ignore[union-attr]
    # a model that meets the bar but is not smaller (or faster) than the original is no choice
    assert choose([_trial(0, 1.0, 100, 1.2)], "size", 0.99, 100) is None
    assert choose([_trial(0, 1.0, 90, 1.01)], "latency", 0.99, 100) is None


def test_search_space_and_stage_order() -> None:
    space = build_search_space(["cleanup", "quant", "lowrank", "sparsify"], 0.98, FIXED)
    assert space.base == {"cleanup": {}}
    assert space.lossy == ["quant", "lowrank", "sparsify"]
    quant = [s.options for s in space.settings["quant"]]
    assert quant[0] == {"min_macs": 0.0, "target_cosine": 0.98}
    assert all(options["min_macs"] == 0.0 for options in quant)  # fixed options in every one
    lowrank = [s.options for s in space.settings["lowrank"]]
    assert {"min_size": 0} in lowrank  # ratio 0.75 is the default: dropped from the options
    order = [setting.pass_name for setting, _ in sensitivity_order(space, "size")]
    assert order[:3] == ["quant", "lowrank", "sparsify"]  # round-robin: every pass early
    # unstructured and N:M sparsity neither shrink nor speed up the model: they come last
    tail = [
        setting.options.get("pattern", "unstructured")
        for setting, _ in sensitivity_order(space, "size")[-4:]
    ]
    assert tail == ["unstructured", "unstructured", "n:m", "unstructured"]
    # a fixed option overriding a setting merges settings that became identical
    merged = build_search_space(["lowrank"], 0.99, {"lowrank": {"ratio": 0.5}})
    assert [s.options for s in merged.settings["lowrank"]] == [
        {"ratio": 0.5},
        {"energy": 0.99, "ratio": 0.5},
    ]


def test_combinations_predict_additive_error_and_skip_useless_settings() -> None:
    quant = Setting("quant", {})
    lowrank = Setting("lowrank", {"ratio": 0.5})
    fp16 = Setting("fp16", {})
    sparse = Setting("sparsify", {"sparsity": 0.3})
    singles = {
        "quant": [(quant, _trial(0, 0.996, 25))],
        "lowrank": [(lowrank, _trial(1, 0.97, 50))],  # too far from the bar: not combined
        "fp16": [(fp16, _trial(2, 0.9999, 50, lossy=("fp16",)))],
        "sparsify": [(sparse, _trial(3, 0.999, 100, lossy=("sparsify",)))],  # no size gain
    }
    combos = combinations(singles, "size", 0.99, 100)
    assert [(tuple(s.pass_name for s in settings), round(err, 6)) for settings, err in combos] == [
        (("fp16", "quant"), 0.0041)
    ]


# --- the search ----------------------------------------------------------------------------------


def test_search_respects_budget_and_passes(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = _tune(tiny, tmp_path / "out", passes=["cleanup", "quant", "lowrank"], budget=5)
    assert len(result.trials) == 5 and result.evaluated == 5 and result.cached == 0
    assert result.stopped == "budget of 5 trials reached"
    assert all(set(t.candidate.lossy) <= {"quant", "lowrank"} for t in result.trials)
    assert all("cleanup" in t.candidate.passes for t in result.trials)
    assert {t.candidate.lossy for t in result.trials[:2]} == {("quant",), ("lowrank",)}
    assert result.passed and result.chosen is not None
    assert result.chosen.evaluation.size_bytes < result.original_bytes  # type: ignore[union-attr]
    assert result.chosen.cosine >= 0.99
    chosen_size = result.chosen.evaluation.size_bytes  # type: ignore[union-attr]
    assert chosen_size == min(
        t.evaluation.size_bytes
        for t in result.trials
        if t.meets(0.99)  # type: ignore[union-attr]
    )


def test_time_limit_stops_starting_trials(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = _tune(tiny, tmp_path / "out", time_limit=1e-9)
    assert result.trials == [] and not result.passed
    assert result.stopped == "time limit reached"
    assert "no candidate was tried" in result.message
    assert not (tmp_path / "out" / "best.onnx").exists()


def test_rerun_evaluates_nothing_and_more_budget_only_new(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = _tune(tiny, out, budget=4)
    assert first.evaluated == 4
    again = _tune(tiny, out, budget=4)
    assert again.evaluated == 0 and again.cached == 4
    assert _summary(again) == _summary(first)
    assert again.chosen is not None and again.chosen.key == first.chosen.key  # type: ignore[union-attr]
    more = _tune(tiny, out, budget=7)
    new_keys = {t.key for t in more.trials} - {t.key for t in first.trials}
    assert len(more.trials) == 7 and more.evaluated == len(new_keys) > 0

    # Python feeds are saved into the folder; the same feeds again hash the same (by content,
    # not by the zip container's timestamps), so the rerun is all cache hits
    feeds = [{"x": np.load(tiny["calib"])["x"][i : i + 16]} for i in range(0, 64, 16)]
    listed = _tune(tiny, out, budget=2, calib_data=feeds)
    assert (out / "data" / "calibration" / "00003.npz").is_file()
    assert listed.evaluated == 2  # other feeds (batches of 16): other keys
    assert _tune(tiny, out, budget=2, calib_data=list(feeds)).evaluated == 0


def test_resume_after_a_killed_run(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    complete = _tune(tiny, out, budget=6)
    journal = out / "trials.jsonl"
    lines = journal.read_text().splitlines()
    assert len(lines) == 6
    # a run killed after three evaluations, mid-way through writing the fourth journal line,
    # that also lost its cache folder: the journal alone carries the results
    for entry in (out / "cache").glob("*.json"):
        entry.unlink()
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    resumed = _tune(tiny, out, budget=6)
    assert resumed.cached == 3 and resumed.evaluated == 3
    assert _summary(resumed) == _summary(complete)
    assert resumed.chosen is not None and resumed.chosen.key == complete.chosen.key  # type: ignore[union-attr]


def test_two_processes_give_the_serial_result(tiny: dict[str, Path], tmp_path: Path) -> None:
    serial = _tune(tiny, tmp_path / "serial", budget=6)
    with LocalProcessExecutor(2) as pool:
        parallel = _tune(tiny, tmp_path / "parallel", budget=6, executor=pool)
    assert parallel.evaluated == 6
    assert _summary(parallel) == _summary(serial)
    assert [t.key for t in parallel.size_front] == [t.key for t in serial.size_front]
    assert sha256_of(tmp_path / "parallel" / "best.onnx") == sha256_of(
        tmp_path / "serial" / "best.onnx"
    )


def test_latency_objective_measures_only_what_can_matter(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    result = _tune(tiny, tmp_path / "out", objective="latency", budget=5)
    slack = 1.0 - 0.99
    for trial in result.trials:
        if trial.meets(0.99):
            assert trial.latency is not None
        if trial.latency is not None:
            assert trial.ok and 1.0 - trial.cosine <= 2.0 * slack
    if result.chosen is not None:
        assert result.chosen.latency_ratio is not None and result.chosen.latency_ratio < 1.0
        assert (tmp_path / "out" / "best.onnx").is_file()
    else:
        assert "faster" in result.message and not (tmp_path / "out" / "best.onnx").exists()


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_outputs_and_recipe_reproduces_best_byte_for_byte(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["tune", str(tiny["model"]), "--calib-data", str(tiny["calib"])]
    args += ["--data", str(tiny["val"]), "--budget", "5", "--out-dir", str(out)]
    args += [*FIXED_FLAGS, "--workers", "0", "--latency-runs", "3", "--min-cosine", "0.99"]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert "chosen" in stdout and "[5/5]" in stderr
    for name in ("best.onnx", "recipe.json", "front.md", "front.json", "front.png"):
        assert (out / name).is_file(), name
    assert (out / "front.png").read_bytes()[:8] == PNG_MAGIC
    front = json.loads((out / "front.json").read_text())
    assert front["chosen"]["key"] and front["size_front"] and len(front["trials"]) == 5
    assert "**chosen**" in (out / "front.md").read_text()
    recipe = json.loads((out / "recipe.json").read_text())
    assert set(recipe) == {"passes", "options"} and "cleanup" in recipe["passes"]
    remade = tmp_path / "remade.onnx"
    replay = ["optimize", str(tiny["model"]), str(remade), "--recipe", str(out / "recipe.json")]
    replay += ["--calib-data", str(tiny["calib"]), "--no-validate"]
    code, _, stderr = run_cli(replay, capsys)
    assert code == 0, stderr
    assert sha256_of(remade) == sha256_of(out / "best.onnx")
    kept = sorted(path.name for path in (out / "candidates").glob("*.onnx"))
    front_keys = {row["key"][:24] for row in front["size_front"] + front["latency_front"]}
    assert {name[:-5] for name in kept} <= front_keys | {front["chosen"]["key"][:24]}


def test_nothing_meets_the_bar_exits_1_without_best(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.onnx").write_bytes(b"stale")  # from an earlier run with a looser bar
    (out / "recipe.json").write_text("{}")
    args = ["tune", str(tiny["model"]), "--calib-data", str(tiny["calib"])]
    args += ["--data", str(tiny["val"]), "--passes", "sparsify", "--budget", "3"]
    args += ["--min-cosine", "0.99999", "--out-dir", str(out), "--workers", "0"]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 1
    assert "no candidate meets min cosine 0.99999" in stdout
    assert not (out / "best.onnx").exists() and not (out / "recipe.json").exists()
    assert (out / "front.md").is_file() and (out / "front.png").is_file()
    assert json.loads((out / "front.json").read_text())["chosen"] is None


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("MODEL", "missing.onnx", "no such file"),
        ("--min-cosine", "1.5", "--min-cosine"),
        ("--min-cosine", "0", "--min-cosine"),
        ("-o", "quant.nope=1", "has no option 'nope'"),
        ("-o", "fp16.dtype=int3", "fp16.dtype"),
        ("--passes", "nope", "unknown pass 'nope'"),
        ("--passes", "cleanup", "no lossy pass"),
        ("--calib-data", "missing.npz", "does not exist"),
        ("--data", "missing.npz", "does not exist"),
        ("--input-shapes", "x:1x65", "--input-shapes"),
        ("--objective", "speed", "--objective"),
        ("--budget", "0", "--budget"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tiny: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str | None,
    message: str,
) -> None:
    out = tmp_path / "out"
    if value is not None and value.startswith("missing"):
        value = str(tmp_path / value)
    flags: dict[str, str | None] = {
        "MODEL": str(tiny["model"]),
        "--calib-data": str(tiny["calib"]),
        "--data": str(tiny["val"]),
        "--out-dir": str(out),
        "--budget": "2",
        "--workers": "0",
    }
    flags[flag] = value
    args = ["tune", str(flags.pop("MODEL"))]
    for key, text in flags.items():
        if text is not None:
            args += [key, text]
    code, _, stderr = run_cli(args, capsys)
    assert code == 2
    assert message in stderr
    assert stderr.startswith("graphopt: error") and stderr.count("\n") == 1
    assert "Traceback" not in stderr
    assert not out.exists(), "bad input must not leave an output folder behind"


# --- executors and the plot ----------------------------------------------------------------------


def test_default_workers_respects_memory_and_cores() -> None:
    model_bytes = 100 << 20
    assert default_workers(model_bytes, available=1 << 20) == 1
    assert 1 <= default_workers(model_bytes, available=1 << 40) <= (os.cpu_count() or 1)
    with pytest.raises(ValueError):
        LocalProcessExecutor(0)


def test_a_dead_worker_is_a_transient_error_and_the_pool_recovers(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    def task(key: str) -> EvaluationTask:
        return EvaluationTask(
            key=key,
            model_path=str(tiny["model"]),
            calib_data=str(tiny["calib"]),
            validation_data=str(tiny["val"]),
            passes=("cleanup", "quant"),
            options={"quant": {"min_macs": 0}},
            output_path=str(tmp_path / f"{key}.onnx"),
        )

    with LocalProcessExecutor(1) as pool:
        pool.submit(task("killed"))
        for process in list(pool._pool._processes.values()):  # type: ignore[union-attr]
            process.kill()
        lost = pool.next_result()
        assert (lost.key, lost.status, lost.transient) == ("killed", "error", True)
        pool.submit(task("after"))
        fine = pool.next_result()
        assert fine.key == "after" and fine.ok and fine.min_cosine > 0.99
    cache = TuneCache(tmp_path / "out")
    cache.put(lost, stage="sensitivity")
    assert cache.get("killed") is None, "transient failures are retried, never cached"


def test_plot_is_a_png(tmp_path: Path) -> None:
    points = [
        PlotPoint("a", 0.999, 30_000, 0.8, True, True, chosen=True),
        PlotPoint("b", 0.95, 20_000, None, True, False),
        PlotPoint("c", 1.0, 50_000, 1.1, True, False),
        PlotPoint("d", 0.5, 90_000, None, False, False),
    ]
    path = plot_front(
        tmp_path / "front.png", points, original_bytes=100_000, min_cosine=0.99, title="t"
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*.tmp"))
