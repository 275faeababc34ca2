"""Issue 18.2: recording the feeds an application passes to ONNX Runtime (graphopt.data.capture)
and the ``graphopt capture -- COMMAND`` command (graphopt.cli.capture)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli.capture import capture_command, parse_size
from graphopt.data import capture as capture_module
from graphopt.data.capture import LOCK_NAME, STATE_NAME, FeedRecorder, record_feeds
from graphopt.data.feeds import input_specs, open_data
from graphopt.errors import InputError, OptionError
from graphopt.ir.model import load_model

from ..conftest import REPO_ROOT, make_model, weight

CAPTURE_LOGGER = "graphopt.data.capture"


def _masked_matmul(columns: int, seed: int) -> onnx.ModelProto:
    """x[batch, seq, 8] → MatMul W → y[batch, seq, columns], times mask[batch, seq] (int64)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["y"]),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", columns])],
        [weight("W", (8, columns), seed), numpy_helper.from_array(np.array([-1]), "last")],
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``encoder``: the masked MatMul; ``decoder``: a different one; ``twin``: another file
    named ``encoder.onnx`` with the decoder's content."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "other").mkdir()
    paths = {
        "encoder": folder / "encoder.onnx",
        "decoder": folder / "decoder.onnx",
        "twin": folder / "other" / "encoder.onnx",
    }
    onnx.save(_masked_matmul(16, 1), paths["encoder"])
    onnx.save(_masked_matmul(4, 2), paths["decoder"])
    onnx.save(_masked_matmul(4, 2), paths["twin"])
    return paths


def _session(source: Path | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _feed(batch: int, seq: int, value: float = 0.0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(batch * 100 + seq).standard_normal((batch, seq, 8)) + value
    mask = np.ones((batch, seq), np.int64)
    mask[:, seq // 2 :] = 0
    return {"x": x.astype(np.float32), "mask": mask}


def _npz_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npz"))


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture
def unpatched() -> Iterator[None]:
    """Every test leaves ONNX Runtime as it found it."""
    yield
    assert "run" not in ort.InferenceSession.__dict__
    assert ort.InferenceSession.run is ort.capi.onnxruntime_inference_collection.Session.run


pytestmark = pytest.mark.usefixtures("unpatched")


def test_feeds_are_written_as_passed_one_file_per_call(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    session = _session(models["encoder"])  # created before recording starts
    shapes = [(1, 3), (2, 5), (3, 1)]
    passed, results = [], []
    with record_feeds(tmp_path / "out") as recorder:
        for batch, seq in shapes:
            feed = _feed(batch, seq)
            passed.append({name: value.copy() for name, value in feed.items()})
            results.append(session.run(None, feed)[0])
            feed["x"][...] = 7.0  # changed after the call: the copy was taken at call time
    folder = tmp_path / "out" / "encoder"
    files = _npz_files(folder)
    assert [f.name for f in files] == ["000000.npz", "000001.npz", "000002.npz"]
    for file, want, result in zip(files, passed, results, strict=True):
        got = _load(file)
        assert sorted(got) == ["mask", "x"]
        for name in want:
            assert got[name].dtype == want[name].dtype
            np.testing.assert_array_equal(got[name], want[name])
        np.testing.assert_allclose(result, _session(models["encoder"]).run(None, want)[0])
    summary = recorder.summary
    assert [(m.folder, m.feeds, m.calls) for m in summary.models] == [(folder, 3, 3)]
    assert summary.bytes == sum(f.stat().st_size for f in files)
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # the lock is removed at the end
    assert json.loads((tmp_path / "out" / STATE_NAME).read_text())["active"] is False


def test_only_the_sessions_inputs_are_kept_and_ort_values_are_recorded(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    session = _session(models["encoder"])
    feed = _feed(2, 4)
    ort_feed = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feed.items()}
    with record_feeds(tmp_path / "out"):
        session.run(["y"], input_feed=feed)  # keyword feed
        session.run_with_ort_values(["y"], ort_feed)
        with pytest.raises(Exception, match="Invalid input name"):
            session.run(None, {**feed, "extra": np.zeros(1, np.float32)})
    files = _npz_files(tmp_path / "out" / "encoder")
    assert len(files) == 2  # the call that raised left no file
    for file in files:
        got = _load(file)
        assert sorted(got) == ["mask", "x"]
        np.testing.assert_array_equal(got["x"], feed["x"])


def test_a_failing_call_raises_as_before_and_is_not_recorded(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    session = _session(models["encoder"])
    bad = {"x": np.zeros((2, 8), np.float32), "mask": np.ones((2, 1), np.int64)}
    with pytest.raises(Exception) as without:
        session.run(None, bad)
    with record_feeds(tmp_path / "out") as recorder, pytest.raises(Exception) as within:
        session.run(None, bad)
    assert type(within.value) is type(without.value)
    assert str(within.value) == str(without.value)
    assert _npz_files(tmp_path / "out" / "encoder") == []
    assert recorder.summary.models[0].skipped == {"failed": 1}


def test_iobinding_calls_are_counted_and_warned_once(
    tmp_path: Path, models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    session = _session(models["encoder"])
    feed = _feed(1, 2)
    with caplog.at_level(logging.WARNING, CAPTURE_LOGGER):
        with record_feeds(tmp_path / "out") as recorder:
            for _ in range(2):
                binding = session.io_binding()
                for name, value in feed.items():
                    binding.bind_cpu_input(name, value)
                binding.bind_output("y")
                session.run_with_iobinding(binding)
            session.run(None, feed)
    warnings = [r.getMessage() for r in caplog.records if "run_with_iobinding" in r.getMessage()]
    assert len(warnings) == 1
    model = recorder.summary.models[0]
    assert (model.feeds, model.calls, model.skipped) == (1, 3, {"run_with_iobinding": 2})


def test_every_keeps_the_first_call_and_every_kth_after_it(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    session = _session(models["encoder"])
    with record_feeds(tmp_path / "out", every=3) as recorder:
        for seq in range(1, 11):
            session.run(None, _feed(1, seq))
    files = _npz_files(tmp_path / "out" / "encoder")
    assert [_load(f)["x"].shape[1] for f in files] == [1, 4, 7, 10]
    assert recorder.summary.models[0].skipped == {"every": 6}


def test_max_feeds_stops_each_model_on_its_own(tmp_path: Path, models: dict[str, Path]) -> None:
    encoder, decoder = _session(models["encoder"]), _session(models["decoder"])
    with record_feeds(tmp_path / "out", max_feeds=2) as recorder:
        for seq in range(1, 6):
            encoder.run(None, _feed(1, seq))
        decoder.run(None, _feed(1, 1))
    assert [f.name for f in _npz_files(tmp_path / "out" / "encoder")] == [
        "000000.npz",
        "000001.npz",
    ]
    assert len(_npz_files(tmp_path / "out" / "decoder")) == 1
    counts = {m.folder.name: (m.feeds, m.skipped) for m in recorder.summary.models}
    assert counts == {"decoder": (1, {}), "encoder": (2, {"max_feeds": 3})}


def test_max_bytes_bounds_the_files_and_warns_once(
    tmp_path: Path, models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    session = _session(models["encoder"])
    with record_feeds(tmp_path / "probe"):
        session.run(None, _feed(2, 3))
    size = _npz_files(tmp_path / "probe" / "encoder")[0].stat().st_size
    with caplog.at_level(logging.WARNING, CAPTURE_LOGGER):
        with record_feeds(tmp_path / "out", max_bytes=int(2.5 * size)) as recorder:
            for _ in range(6):
                session.run(None, _feed(2, 3))
            session.run(None, _feed(1, 1))  # smaller, but recording has stopped
    files = _npz_files(tmp_path / "out" / "encoder")
    assert len(files) == 2
    assert sum(f.stat().st_size for f in files) <= 2.5 * size
    summary = recorder.summary
    assert summary.stopped == "max_bytes"
    assert summary.models[0].skipped == {"max_bytes": 5}
    assert sum("max_bytes" in r.getMessage() for r in caplog.records) == 1


def test_each_model_gets_its_own_folder(tmp_path: Path, models: dict[str, Path]) -> None:
    from_bytes = models["decoder"].read_bytes()
    sessions = [
        _session(models["encoder"]),
        _session(from_bytes),
        _session(models["twin"]),  # same stem as encoder.onnx, another file
        _session(models["encoder"]),  # a second session of the same file: the same folder
    ]
    with record_feeds(tmp_path / "out") as recorder:
        for session in sessions:
            session.run(None, _feed(1, 2))
    folders = {m.folder.name: m for m in recorder.summary.models}
    assert set(folders) == {"encoder", f"model-{_sha256(from_bytes)[:8]}", _twin_folder(folders)}
    assert folders["encoder"].feeds == 2
    assert folders["encoder"].source == str(models["encoder"].resolve())
    assert all(len(_npz_files(m.folder)) == m.feeds for m in folders.values())


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _twin_folder(folders: dict[str, object]) -> str:
    twins = [name for name in folders if name.startswith("encoder-")]
    assert len(twins) == 1 and len(twins[0]) == len("encoder-") + 8
    return twins[0]


def test_model_filter_matches_paths_and_bytes(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(models["encoder"].parent)
    by_relative_path = _session(Path("encoder.onnx"))
    by_bytes = _session(models["encoder"].read_bytes())
    other = _session(models["decoder"])
    other_bytes = _session(models["decoder"].read_bytes())
    with record_feeds(tmp_path / "out", model=models["encoder"]) as recorder:
        for session in (by_relative_path, by_bytes, other, other_bytes):
            session.run(None, _feed(1, 3))
    files = _npz_files(tmp_path / "out")  # straight into out_dir
    assert len(files) == 2
    assert [p.name for p in (tmp_path / "out").iterdir() if p.is_dir()] == []
    summary = recorder.summary
    assert [(m.folder, m.feeds) for m in summary.models] == [(tmp_path / "out", 2)]
    assert sum(summary.ignored.values()) == 2
    assert str(models["decoder"].resolve()) in summary.ignored


def test_threads_share_one_numbering(tmp_path: Path, models: dict[str, Path]) -> None:
    session = _session(models["encoder"])
    threads_count, calls = 6, 15

    def work(thread: int) -> None:
        for call in range(calls):
            session.run(None, _feed(1, 1 + call % 4, value=1000.0 * thread + call))

    with record_feeds(tmp_path / "out") as recorder:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    files = _npz_files(tmp_path / "out" / "encoder")
    assert [f.name for f in files] == [f"{i:06d}.npz" for i in range(threads_count * calls)]
    tags = sorted(round(float(np.median(_load(f)["x"])) / 100) for f in files)
    assert tags == sorted(10 * t + c // 100 for t in range(threads_count) for c in range(calls))
    assert recorder.summary.feeds == threads_count * calls


def _fork(child: Callable[[], bool]) -> int:
    """Fork; the child runs ``child`` and exits at once: 0 when it returned True, else 1."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 1
        try:
            code = 0 if child() else 1
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None (and the child killed) when it runs past ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _returns_within(call: Callable[[], object], timeout: float) -> bool:
    """Whether ``call`` returns within ``timeout`` (run in a daemon thread: a hang fails the
    test instead of hanging the suite)."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def _hold(
    lock_context: Callable[[], AbstractContextManager[object]], seconds: float
) -> threading.Thread:
    """A thread that stays inside ``lock_context()`` for ``seconds``; returns once it is in."""
    inside = threading.Event()

    def hold() -> None:
        with lock_context():
            inside.set()
            time.sleep(seconds)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert inside.wait(2)
    return thread


def _in_transaction(recorder: FeedRecorder, seconds: float) -> threading.Thread:
    """Another thread of the application inside one of the recording's state transactions."""
    ledger = recorder._capture_folder().ledger
    return _hold(ledger.transaction, seconds)


def _one_thread_session(path: Path) -> ort.InferenceSession:
    """A session without a thread pool, which a forked child can run."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_a_fork_during_a_transaction_does_not_block_the_parent(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """Rules 2, 9: a long-lived child forked while another thread holds the shared lock (a pool
    worker) does not keep the lock: the parent's next call records at once."""
    session = _one_thread_session(models["encoder"])
    with record_feeds(tmp_path / "out") as recorder:
        holder = _in_transaction(recorder, 0.2)
        worker = _fork(lambda: time.sleep(30) or True)
        try:
            holder.join(2)
            assert _returns_within(lambda: session.run(None, _feed(1, 2)), timeout=1.0)
        finally:
            os.kill(worker, signal.SIGKILL)
            os.waitpid(worker, 0)
    assert len(_npz_files(tmp_path / "out" / "encoder")) == 1


def test_a_process_forked_during_a_transaction_records_on(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """Rule 9: the child of a fork made while another thread holds the locks starts with free
    locks and records into the same capture."""
    session = _one_thread_session(models["encoder"])
    with record_feeds(tmp_path / "out") as recorder:
        holder = _in_transaction(recorder, 0.2)
        child = _fork(lambda: _returns_within(lambda: session.run(None, _feed(1, 3)), 1.0))
        holder.join(2)
        assert _exit_code(child, timeout=1.5) == 0
        session.run(None, _feed(1, 2))
    files = _npz_files(tmp_path / "out" / "encoder")
    assert [_load(f)["x"].shape for f in files] == [(1, 3, 8), (1, 2, 8)]
    assert recorder.summary.processes == 1  # the child counts as the parent's process


def test_a_fork_while_a_recording_starts_leaves_the_child_free_to_record(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """Rules 8, 9: a fork while another thread starts or stops a recording (holding the lock that
    makes that one step) leaves the child able to record."""
    session = _one_thread_session(models["encoder"])

    def record_in_child() -> bool:
        with record_feeds(tmp_path / "child"):
            session.run(None, _feed(1, 2))
        return True

    holder = _hold(lambda: capture_module._PATCH_LOCK, 0.2)
    child = _fork(lambda: _returns_within(record_in_child, 1.0))
    holder.join(2)
    assert _exit_code(child, timeout=1.5) == 0
    assert len(_npz_files(tmp_path / "child" / "encoder")) == 1


def test_methods_are_restored_after_an_exception(tmp_path: Path, models: dict[str, Path]) -> None:
    session = _session(models["encoder"])
    with pytest.raises(RuntimeError, match="app failed"), record_feeds(tmp_path / "out"):
        assert "run" in ort.InferenceSession.__dict__
        session.run(None, _feed(1, 2))
        raise RuntimeError("app failed")
    assert "run" not in ort.InferenceSession.__dict__
    assert "run_with_iobinding" not in ort.InferenceSession.__dict__
    session.run(None, _feed(1, 2))  # not recorded any more
    assert len(_npz_files(tmp_path / "out" / "encoder")) == 1
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_nested_recording_is_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    session = _session(models["encoder"])
    with record_feeds(tmp_path / "out"):
        with (
            pytest.raises(InputError, match="already being recorded"),
            record_feeds(tmp_path / "inner"),
        ):
            pass
        session.run(None, _feed(1, 2))  # the outer recording goes on
    assert len(_npz_files(tmp_path / "out" / "encoder")) == 1
    assert not (tmp_path / "inner").exists()


def test_a_write_error_stops_recording_but_not_the_app(
    tmp_path: Path, models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    session = _session(models["encoder"])
    expected = session.run(None, _feed(2, 3))[0]
    with caplog.at_level(logging.WARNING, CAPTURE_LOGGER):
        with record_feeds(tmp_path / "out") as recorder:
            (tmp_path / "out" / "encoder").write_text("a file where the folder goes")
            results = [session.run(None, _feed(2, 3))[0] for _ in range(3)]
    for result in results:
        np.testing.assert_array_equal(result, expected)
    assert sum("stopped recording" in r.getMessage() for r in caplog.records) == 1
    model = recorder.summary.models[0]
    assert (model.feeds, model.skipped) == (0, {"write_error": 3})


def test_limits_are_checked(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="every"):
        record_feeds(tmp_path, every=0)
    with pytest.raises(OptionError, match="max_feeds"):
        record_feeds(tmp_path, max_feeds=0)
    with pytest.raises(InputError, match="no such file"):
        record_feeds(tmp_path, model=tmp_path / "missing.onnx")
    assert (parse_size("512"), parse_size("2K"), parse_size("1.5GiB")) == (512, 2048, 3 << 29)
    with pytest.raises(InputError, match="--max-bytes"):
        parse_size("lots")


def test_a_folder_with_other_files_is_refused_and_a_previous_capture_replaced(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    session = _session(models["encoder"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"notes\.txt.*not a previous capture"), record_feeds(mine):
        pass
    assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    with record_feeds(out):
        for seq in (1, 2, 3):
            session.run(None, _feed(1, seq))
    (out / "encoder" / "extra.txt").write_text("mine")  # a user file inside a model folder
    with pytest.raises(InputError, match=r"encoder/extra\.txt"), record_feeds(out):
        pass
    (out / "encoder" / "extra.txt").unlink()
    with record_feeds(out):
        session.run(None, _feed(1, 5))
    assert [_load(f)["x"].shape for f in _npz_files(out / "encoder")] == [(1, 5, 8)]
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a folder"), record_feeds(tmp_path / "file"):
        pass


def test_the_folder_opens_as_calib_data_and_calibrates(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    from graphopt.pipeline import optimize

    session = _session(models["encoder"])
    with record_feeds(tmp_path / "feeds", model=models["encoder"]):
        for batch, seq in [(1, 3), (2, 5), (4, 2)]:
            session.run(None, _feed(batch, seq))
    specs = input_specs(load_model(models["encoder"]).graph)
    feeds = list(open_data(tmp_path / "feeds", specs))
    assert [feed["x"].shape for feed in feeds] == [(1, 3, 8), (2, 5, 8), (4, 2, 8)]
    report = optimize(
        models["encoder"],
        tmp_path / "q.onnx",
        ["quant"],
        options={"quant": {"min_macs": 0}},  # the tiny MatMul is below the default size rule
        data=tmp_path / "feeds",
        validate=False,
    )
    assert (tmp_path / "q.onnx").exists()
    assert any(record.modified for record in report.run.records)


@pytest.fixture
def cli_logging_kept() -> Iterator[None]:
    """The command sets up the CLI's logging (main() undoes that; here the test does)."""
    loggers = [logging.getLogger(name) for name in ("graphopt", "passes")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.mark.usefixtures("cli_logging_kept")
def test_cli_options_are_checked_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data.npz").write_bytes(b"")
    cases = [
        (["--out", str(tmp_path / "new")], "no command given"),
        (["--out", str(tmp_path / "new"), "--evry", "2", "--", "python"], "unknown option"),
        (["--out", str(tmp_path / "new"), "--", "no-such-program-xyz"], "no such command"),
        (["--out", str(tmp_path / "out"), "--", sys.executable, "-c", "pass"], "data.npz"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=message):
            capture_command.main(args, standalone_mode=False)
    assert not (tmp_path / "new").exists()


# -- graphopt capture -- COMMAND, end to end ---------------------------------------------------

_APP = """
import json, os, subprocess, sys
import numpy as np
import onnxruntime as ort
import sitecustomize

role, first, second = sys.argv[1:4]
options = ort.SessionOptions()
options.log_severity_level = 3
session = ort.InferenceSession(first, options, providers=["CPUExecutionProvider"])
for seq in (1, 2, 3):
    x = np.full((1, seq, 8), seq, np.float32)
    session.run(None, {"x": x, "mask": np.ones((1, seq), np.int64)})
if role == "parent":
    subprocess.run([sys.executable, __file__, "child", first, second], check=True)
else:
    other = ort.InferenceSession(second, options, providers=["CPUExecutionProvider"])
    other.run(None, {"x": np.zeros((2, 1, 8), np.float32), "mask": np.ones((2, 1), np.int64)})
bootstrap = [p for p in sys.path if "graphopt-capture-" in p]
print(json.dumps({"role": role, "site": getattr(sitecustomize, "MARK", None), "path": bootstrap}))
sys.exit(int(os.environ.get("APP_EXIT", "0")) if role == "parent" else 0)
"""

_CLI = (
    "import sys\n"
    "from graphopt.cli.commands import cli, main\n"
    "from graphopt.cli.capture import capture_command\n"
    "cli.add_command(capture_command, 'capture')\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _capture(
    tmp_path: Path, args: list[str], command: list[str], **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``graphopt capture ARGS -- COMMAND`` in a fresh process. graphopt is importable there
    from the working folder only; the app (a script elsewhere) gets it from the bootstrap."""
    user_site = tmp_path / "user_site"
    user_site.mkdir(exist_ok=True)
    (user_site / "sitecustomize.py").write_text("MARK = 'user'\n")
    environment = {**os.environ, "PYTHONPATH": str(user_site), **env}
    return subprocess.run(
        [sys.executable, "-c", _CLI, "capture", *args, "--", *command],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_capture_records_a_program_and_its_child_processes(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    app = tmp_path / "app" / "app.py"
    app.parent.mkdir()
    app.write_text(_APP)
    out = tmp_path / "feeds"
    command = [sys.executable, str(app), "parent", str(models["encoder"]), str(models["decoder"])]
    done = _capture(tmp_path, ["--out", str(out), "--max-feeds", "4"], command)
    assert done.returncode == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    # the user's sitecustomize ran in both processes; the bootstrap left sys.path as it was
    assert sorted(reports, key=lambda r: r["role"]) == [
        {"role": "child", "site": "user", "path": []},
        {"role": "parent", "site": "user", "path": []},
    ]
    lines = [line for line in done.stdout.splitlines() if "--calib-data" in line]
    assert lines == [
        f"decoder: 1 feed, {_size(out / 'decoder')} (1 call) → --calib-data {out / 'decoder'}",
        f"encoder: 4 feeds, {_size(out / 'encoder')} (6 calls, skipped: max_feeds 2) "
        f"→ --calib-data {out / 'encoder'}",
    ]
    # --max-feeds held across the two processes: the parent's three calls, then the child's first
    values = [float(_load(f)["x"].max()) for f in _npz_files(out / "encoder")]
    assert values == [1.0, 2.0, 3.0, 1.0]
    assert sorted(p.name for p in out.iterdir()) == [STATE_NAME, "decoder", "encoder"]
    specs = input_specs(load_model(models["encoder"]).graph)
    assert len(list(open_data(out / "encoder", specs))) == 4


def _size(folder: Path) -> str:
    total = sum(f.stat().st_size for f in _npz_files(folder))
    return f"{total / 1024:.1f} KiB" if total >= 1024 else f"{total} B"


def test_capture_reports_a_failed_command_and_keeps_its_feeds(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    app = tmp_path / "app.py"
    app.write_text(_APP)
    out = tmp_path / "feeds"
    command = [sys.executable, str(app), "parent", str(models["encoder"]), str(models["decoder"])]
    args = ["--out", str(out), "--model", str(models["decoder"])]
    done = _capture(tmp_path, args, command, APP_EXIT="3")
    assert done.returncode == 1, done.stderr
    assert "the command exited with code 3" in done.stderr
    assert f"→ --calib-data {out}\n" in done.stdout
    assert len(_npz_files(out)) == 1


def test_capture_without_any_run_is_exit_2_with_one_line(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    done = _capture(tmp_path, ["--out", str(tmp_path / "a")], [sys.executable, "-c", "pass"])
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "no ONNX Runtime session run was seen" in done.stderr
    assert "onnxruntime's Python API" in done.stderr
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "s.run(None, {'x': np.zeros((1, 1, 8), np.float32), 'mask': np.ones((1, 1), np.int64)})\n"
    )
    args = ["--out", str(tmp_path / "b"), "--model", str(models["decoder"])]
    done = _capture(tmp_path, args, [sys.executable, "-c", script, str(models["encoder"])])
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert f"no run of --model {models['decoder']} was seen" in done.stderr
    assert "encoder.onnx" in done.stderr
