"""The shared data loader and the comparison engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.check.validate import Criteria, compare_models
from graphopt.data.feeds import embedding_bounds, input_specs, open_data, synthesize
from graphopt.errors import DataError, InputError
from graphopt.ir.model import model_from_proto
from graphopt.ir.normalize import normalize

from ..conftest import float_input, make_model, weight


def _specs(proto: onnx.ModelProto):  # type: ignore[no-untyped-def]
    model = model_from_proto(proto)
    return input_specs(model.graph)


def test_npz_is_batched_along_axis0(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(40, dtype=np.float64).reshape(10, 4))
    feeds = open_data(path, _specs(mlp_model), batch_size=4)
    batches = list(feeds)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0]["x"].dtype == np.float32  # float64 of the same kind is cast
    assert feeds.count_samples() == 10
    assert "10 samples" in feeds.description


def test_folder_of_npz_feeds_with_varying_shapes(
    tmp_path: Path, mlp_model: onnx.ModelProto
) -> None:
    for index, rows in enumerate((1, 3)):
        np.savez(tmp_path / f"{index}.npz", x=np.ones((rows, 4), np.float32))
    feeds = open_data(tmp_path, _specs(mlp_model))
    assert [b["x"].shape for b in feeds] == [(1, 4), (3, 4)]


def test_iterables_and_readers_are_replayable(mlp_model: onnx.ModelProto) -> None:
    generator = ({"x": np.ones((2, 4), np.float32)} for _ in range(3))
    feeds = open_data(generator, _specs(mlp_model))
    assert len(list(feeds)) == 3
    assert len(list(feeds)) == 3

    class Reader:
        def __init__(self) -> None:
            self.items = [{"x": np.zeros((1, 4), np.float32)}] * 2

        def get_next(self):  # type: ignore[no-untyped-def]
            return self.items.pop() if self.items else None

    feeds = open_data(Reader(), _specs(mlp_model))
    assert len(list(feeds)) == 2 and len(list(feeds)) == 2


@pytest.mark.parametrize(
    ("feed", "pattern"),
    [
        ({"y": np.ones((1, 4), np.float32)}, "no data for model input 'x'"),
        ({"x": np.ones((1, 4), np.float32), "z": np.ones(1)}, "'z' is not a model input"),
        ({"x": np.ones((1, 4), np.int64)}, "input 'x' expects float32, got int64"),
        ({"x": np.ones((4,), np.float32)}, "input 'x' expects rank 2"),
        ({"x": np.ones((1, 5), np.float32)}, r"input 'x' expects \[batch, 4\], got \[1, 5\]"),
    ],
)
def test_bad_feeds_name_the_input(mlp_model: onnx.ModelProto, feed: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        list(open_data([feed], _specs(mlp_model)))


def test_bad_files(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        open_data(garbage, _specs(mlp_model))
    with pytest.raises(DataError, match="does not exist"):
        open_data(tmp_path / "missing.npz", _specs(mlp_model))
    with pytest.raises(DataError, match="no .npz files"):
        open_data(tmp_path / "..", _specs(mlp_model)) if False else open_data(
            _empty_dir(tmp_path), _specs(mlp_model)
        )


def _empty_dir(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def _bert_like() -> onnx.ModelProto:
    table = numpy_helper.from_array(np.zeros((30, 4), np.float32), "word_embeddings")
    types = numpy_helper.from_array(np.zeros((2, 4), np.float32), "type_embeddings")
    nodes = [
        helper.make_node("Gather", ["word_embeddings", "input_ids"], ["e1"], name="g1"),
        helper.make_node("Cast", ["token_type_ids"], ["tt"], to=TensorProto.INT64, name="c"),
        helper.make_node("Gather", ["type_embeddings", "tt"], ["e2"], name="g2"),
        helper.make_node("Add", ["e1", "e2"], ["e"], name="add"),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="cm"),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"], name="u"),
        helper.make_node("Mul", ["e", "m3"], ["y"], name="mul"),
    ]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    return make_model(
        nodes, ints, [float_input("y", ["batch", "sequence", 4])], [table, types, axes]
    )


def test_synthesized_inputs_respect_semantics() -> None:
    model = model_from_proto(_bert_like())
    normalize(model)
    assert embedding_bounds(model.graph) == {"input_ids": 30, "token_type_ids": 2}
    feeds = synthesize(model.graph, samples=5, batch_size=2, seed=3)
    batches = list(feeds)
    assert feeds.synthetic and "SYNTHETIC" in feeds.description
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    ids = np.concatenate([b["input_ids"].ravel() for b in batches])
    assert ids.min() >= 0 and ids.max() < 30 and len(np.unique(ids)) > 5
    assert all((b["attention_mask"] == 1).all() for b in batches)
    assert all((b["token_type_ids"] == 0).all() for b in batches)
    again = list(synthesize(model.graph, samples=5, batch_size=2, seed=3))
    np.testing.assert_array_equal(again[0]["input_ids"], batches[0]["input_ids"])


# --- comparison engine -----------------------------------------------------------------------


def _logits_model(scale: float = 1.0, nan: bool = False, classes: int = 10) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((8, classes)).astype(np.float32) * scale
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"], name="mm")]
    if nan:
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["raw"], name="mm"),
            helper.make_node("Log", ["raw"], ["logits"], name="log"),
        ]
    return make_model(
        nodes,
        [float_input("x", ["n", 8])],
        [float_input("logits", ["n", classes])],
        [numpy_helper.from_array(w, "W")],
    )


def _feeds(proto: onnx.ModelProto, samples: int = 32):  # type: ignore[no-untyped-def]
    model = model_from_proto(proto)
    normalize(model)
    return synthesize(model.graph, samples=samples, batch_size=8)


def test_identical_models_pass_exact() -> None:
    reference = _logits_model()
    report = compare_models(reference, reference, _feeds(reference), criteria=Criteria(exact=True))
    assert report.passed
    row = report.comparisons[0]
    assert row.cosine == pytest.approx(1.0) and row.max_abs == 0.0 and row.top1 == 1.0
    assert report.samples == 32


def test_perturbed_model_fails_exact_but_meets_a_loose_budget() -> None:
    reference, candidate = _logits_model(), _logits_model(scale=1.001)
    feeds = _feeds(reference)
    strict = compare_models(reference, candidate, feeds, criteria=Criteria(exact=True))
    assert not strict.passed and "elements differ" in strict.failures()[0]
    loose = compare_models(reference, candidate, feeds, criteria=Criteria(min_cosine=0.99))
    assert loose.passed
    assert loose.comparisons[0].snr_db == pytest.approx(60.0, abs=0.5)


def test_cosine_budget_failure_and_top1() -> None:
    reference = _logits_model()
    candidate = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["logits"], name="mm")],
        [float_input("x", ["n", 8])],
        [float_input("logits", ["n", 10])],
        [weight("W", (8, 10), 9)],
    )
    report = compare_models(
        reference, candidate, _feeds(reference), criteria=Criteria(min_cosine=0.99, min_top1=0.9)
    )
    assert not report.passed
    failures = " ".join(report.failures())
    assert "cosine" in failures and "top-1" in failures


def test_nan_candidate_is_flagged() -> None:
    reference = _logits_model()
    report = compare_models(
        reference,
        _logits_model(nan=True),
        _feeds(reference),
        criteria=Criteria(min_cosine=-1.0, min_snr_db=-1e9),
    )
    assert not report.passed
    assert report.comparisons[0].nan_candidate > 0
    assert any("NaN" in f for f in report.failures())


def test_shape_mismatch_is_a_finding_not_a_crash() -> None:
    reference = _logits_model()
    report = compare_models(reference, _logits_model(classes=9), _feeds(reference))
    assert not report.passed
    assert "shape mismatch" in report.failures()[0]


def test_missing_output_and_unloadable_candidate(tmp_path: Path) -> None:
    reference = _logits_model()
    renamed = _logits_model()
    renamed.graph.node[0].output[0] = "other"
    renamed.graph.output[0].name = "other"
    report = compare_models(reference, renamed, _feeds(reference))
    assert "output missing from the candidate" in report.failures()[0]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"junk")
    report = compare_models(reference, broken, _feeds(reference))
    assert "does not load in onnxruntime" in report.failures()[0]
    with pytest.raises(InputError, match="reference model does not load"):
        compare_models(broken, reference, _feeds(reference))
