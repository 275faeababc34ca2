"""Issue 16's fault-injection suite: ``graphopt optimize`` killed, starved of disk, denied
writes and raced, on a model with external data, in real subprocesses.

After every fault: the input is byte-identical; ``OUT`` is absent, the previous output or the
complete new one (its ``OUT.data`` with it) — never a partial file or a mixed pair; and no
temporary file is left outside the temporary folder (the output folder, the input folder and
the working folder hold nothing else). SIGINT / SIGTERM exit 130 / 143 and also leave the
temporary folder empty; SIGKILL cannot clean up, but what it leaves is inside the temporary
folder only.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ..conftest import REPO_ROOT
from ..fs_helpers import folder_digest, read_only, small_disk

WIDTH, LAYERS, SAMPLES = 512, 8, 1024
RUN_TIMEOUT_S = 60


def _build_model(folder: Path) -> tuple[Path, Path]:
    """An MLP whose weights (8 MB) live in ``model.onnx.data``, and 1024 samples for it."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for layer in range(LAYERS):
        scale = 1 / np.sqrt(WIDTH)
        w = (rng.standard_normal((WIDTH, WIDTH)) * scale).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"W{layer}"))
        nodes.append(helper.make_node("MatMul", [current, f"W{layer}"], [f"m{layer}"]))
        nodes.append(helper.make_node("Tanh", [f"m{layer}"], [f"h{layer}"]))
        current = f"h{layer}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    data = folder / "calib.npz"
    np.savez(data, x=rng.standard_normal((SAMPLES, WIDTH)).astype(np.float32))
    return path, data


@dataclass
class Scene:
    """One fault's folders: input (shared, read only), output, temporary, working."""

    source: Path
    data: Path
    out: Path
    tmp: Path
    cwd: Path

    def command(self, passes: str = "fp16", out: Path | None = None) -> list[str]:
        return [
            sys.executable,
            "-m",
            "graphopt",
            "optimize",
            str(self.source),
            str(out or self.out),
            "--passes",
            passes,
            "--calib-data",
            str(self.data),
            "--tmp-dir",
            str(self.tmp),
            "--batch-size",
            "4",
        ]

    def start(self, passes: str = "fp16", **kwargs: object) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CI": "true"}
        return subprocess.Popen(
            self.command(passes),
            cwd=self.cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,  # type: ignore[arg-type]
        )

    def run(self, passes: str = "fp16", **kwargs: object) -> subprocess.CompletedProcess[str]:
        process = self.start(passes, **kwargs)
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _build_model(tmp_path_factory.mktemp("fault") / "input")


@pytest.fixture(scope="module")
def outputs(
    model_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, str]]:
    """What complete runs write, per plan: the only contents a faulted OUT may have (and, under
    "seconds", how long a complete fp16 run takes)."""
    results: dict[str, dict[str, str]] = {}
    for passes in ("cleanup", "fp16"):
        scene = _scene(tmp_path_factory.mktemp(f"complete-{passes}"), model_files)
        process = scene.start(passes)
        assert process.stdout is not None and process.stdout.readline().startswith("plan:")
        started = time.perf_counter()  # the work, from "plan:" to the end
        _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        results["seconds"] = {passes: str(time.perf_counter() - started)}
        assert process.returncode == 0, stderr
        results[passes] = folder_digest(scene.out.parent)
    return results


def _scene(root: Path, model_files: tuple[Path, Path]) -> Scene:
    source, data = model_files
    scene = Scene(source, data, root / "out" / "out.onnx", root / "tmp", root / "cwd")
    for folder in (scene.out.parent, scene.tmp, scene.cwd):
        folder.mkdir(parents=True, exist_ok=True)
    return scene


def _assert_whole(
    scene: Scene, allowed: list[dict[str, str]], input_digest: dict[str, str]
) -> None:
    """The module's contract for one faulted run."""
    assert folder_digest(scene.source.parent) == input_digest, "the input changed"
    state = folder_digest(scene.out.parent)
    if "out.onnx" in state:
        assert state in allowed, f"OUT is neither the previous nor the new output: {state}"
    else:  # OUT absent: at most a data file named after it (rule 4 of graphopt.ir.files)
        assert set(state) <= {"out.onnx.data"}, f"files left beside OUT: {sorted(state)}"
    assert list(scene.cwd.iterdir()) == [], "files left in the working folder"


@pytest.fixture(scope="module")
def input_digest(model_files: tuple[Path, Path]) -> dict[str, str]:
    return folder_digest(model_files[0].parent)


def _kill_after(process: subprocess.Popen[str], delay_s: float, signum: int) -> None:
    """Wait for the run to start its work (``plan:``), then ``delay_s``, then send ``signum``."""
    assert process.stdout is not None
    first = process.stdout.readline()  # "plan: …": the CLI's signal handling is in place
    assert first.startswith("plan:"), first
    time.sleep(delay_s)
    if process.poll() is None:
        process.send_signal(signum)


KILLS = [
    (signum, fraction)
    for signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
    for fraction in random.Random(16).sample([0.02, 0.2, 0.4, 0.6, 0.8, 0.95], 3)
]


@pytest.mark.parametrize(("signum", "fraction"), KILLS)
def test_kill_at_random_points_leaves_whole_files(
    tmp_path: Path,
    model_files: tuple[Path, Path],
    outputs: dict[str, dict[str, str]],
    input_digest: dict[str, str],
    signum: int,
    fraction: float,
) -> None:
    scene = _scene(tmp_path, model_files)
    previous = scene.run("cleanup")  # OUT exists: an interrupted run must keep or replace it
    assert previous.returncode == 0, previous.stderr
    duration = float(outputs["seconds"]["fp16"])

    process = scene.start("fp16")
    _kill_after(process, fraction * duration, signum)
    _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    _assert_whole(scene, [outputs["cleanup"], outputs["fp16"]], input_digest)
    assert "Traceback" not in stderr
    if process.returncode == 0:
        return  # the run finished before the signal
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        return
    # 130 / 143 from graphopt's handler; -signum when the signal came after main() returned,
    # during interpreter shutdown (a shell shows both as 128 + signum)
    assert process.returncode in (128 + signum, -signum), stderr
    assert list(scene.tmp.iterdir()) == [], "temporary files left after a catchable signal"


def _disk_full_run(
    scene: Scene, folder: Path, size_bytes: int
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Run with ``folder`` limited to ``size_bytes``; the result and what the folder held."""
    with small_disk(folder, size_bytes) as limit:
        done = scene.run("fp16", preexec_fn=limit) if limit else scene.run("fp16")
        leftover = folder_digest(folder)
    return done, leftover


@pytest.mark.parametrize("where", ["output folder", "temporary folder"])
def test_full_disk_is_exit_2_with_nothing_half_written(
    tmp_path: Path,
    model_files: tuple[Path, Path],
    outputs: dict[str, dict[str, str]],
    input_digest: dict[str, str],
    where: str,
) -> None:
    scene = _scene(tmp_path, model_files)
    folder = scene.out.parent if where == "output folder" else scene.tmp
    done, leftover = _disk_full_run(scene, folder, 1 << 20)
    assert done.returncode == 2, done.stderr
    assert "No space left on device" in done.stderr or "too large" in done.stderr.lower()
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3
    _assert_whole(scene, [outputs["fp16"]], input_digest)
    assert "out.onnx" not in leftover
    if where == "temporary folder":
        assert leftover == {}, "temporary files left after a failed run"


def test_read_only_folders(
    tmp_path: Path,
    model_files: tuple[Path, Path],
    outputs: dict[str, dict[str, str]],
    input_digest: dict[str, str],
) -> None:
    """A read-only input folder is fine; a read-only output folder is exit 2, up front."""
    scene = _scene(tmp_path, model_files)
    with read_only(scene.source.parent):
        done = scene.run("fp16")
    assert done.returncode == 0, done.stderr
    _assert_whole(scene, [outputs["fp16"]], input_digest)

    other = _scene(tmp_path / "second", model_files)
    with read_only(other.out.parent):
        refused = other.run("fp16")
    assert refused.returncode == 2
    assert "is not writable" in refused.stderr and "Traceback" not in refused.stderr
    assert folder_digest(other.out.parent) == {}


def test_two_runs_onto_one_output_leave_one_whole_output(
    tmp_path: Path,
    model_files: tuple[Path, Path],
    outputs: dict[str, dict[str, str]],
    input_digest: dict[str, str],
) -> None:
    scene = _scene(tmp_path, model_files)
    for stagger in (0.0, 0.2):
        first = scene.start("cleanup")
        time.sleep(stagger)
        second = scene.start("fp16")
        for process in (first, second):
            _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
            assert process.returncode == 0, stderr
        _assert_whole(scene, [outputs["cleanup"], outputs["fp16"]], input_digest)
        assert "out.onnx" in folder_digest(scene.out.parent)
    assert list(scene.tmp.iterdir()) == []


def test_publishing_across_file_systems_is_whole(
    tmp_path: Path,
    model_files: tuple[Path, Path],
    outputs: dict[str, dict[str, str]],
    input_digest: dict[str, str],
) -> None:
    """The output folder on another file system than --tmp-dir: files are copied into unnamed
    files and linked in (graphopt.ir.files rule 3), never left half-written under a name."""
    scene = _scene(tmp_path, model_files)
    with small_disk(scene.out.parent, 64 << 20) as limit:
        if limit is not None:
            pytest.skip("no second file system without root (mount is refused)")
        done = scene.run("fp16")
        _assert_whole(scene, [outputs["fp16"]], input_digest)
        assert done.returncode == 0, done.stderr
        assert folder_digest(scene.out.parent) == outputs["fp16"]


def test_full_disk_while_replacing_keeps_the_previous_output(
    tmp_path: Path,
    model_files: tuple[Path, Path],
    outputs: dict[str, dict[str, str]],
    input_digest: dict[str, str],
) -> None:
    """The output folder holds the previous 8 MB pair and 1 MB more: the new 4 MB fp16 pair
    cannot be copied in, and that is found before the previous pair is touched."""
    scene = _scene(tmp_path, model_files)
    previous_bytes = sum(
        (scene.source.parent / name).stat().st_size for name in ("model.onnx", "model.onnx.data")
    )
    with small_disk(scene.out.parent, previous_bytes + (1 << 20)) as limit:
        if limit is not None:
            pytest.skip("needs a size-limited file system (mount is refused without root)")
        assert scene.run("cleanup").returncode == 0
        before = folder_digest(scene.out.parent)
        assert before == outputs["cleanup"]
        done = scene.run("fp16")
        assert done.returncode == 2, done.stderr
        assert "No space left on device" in done.stderr
        assert folder_digest(scene.out.parent) == before  # the previous pair, untouched
    _assert_whole(scene, [outputs["cleanup"]], input_digest)
    assert list(scene.tmp.iterdir()) == []
