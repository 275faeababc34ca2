"""Padding masks: calibration statistics count valid positions only (graphopt.data.masking)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.data.calibration import StatRequest, collect
from graphopt.data.feeds import input_specs, open_data
from graphopt.data.masking import LayoutDecision, RunMask, resolve_mask_input, run_mask
from graphopt.errors import DataError, OptionError
from graphopt.ir.model import load_model, model_from_proto
from graphopt.pipeline import optimize

from ..conftest import make_model, run_cli, weight

VOCAB, HIDDEN = 20, 8


def token_model(mask_name: str = "attention_mask") -> onnx.ModelProto:
    """ids [b, s] → embedding → MatMul W1 → Relu → MatMul W2 → hidden [b, s, 8], and its
    masked mean over the sequence → pooled [b, 8]. Each position's hidden state depends on
    its own token only, so padding changes nothing the pooled output sees."""
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["embedded"], name="embed"),
        helper.make_node("MatMul", ["embedded", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["hidden"], name="mm2"),
        helper.make_node("Cast", [mask_name], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["hidden", "mask3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "one"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "one"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
    ]
    ints = [
        helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info(mask_name, TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", HIDDEN]),
        ],
        [
            weight("E", (VOCAB, HIDDEN), 0),
            weight("W1", (HIDDEN, 64), 1),
            weight("W2", (64, 8), 2),
            *ints,
        ],
    )


def sentences(count: int = 12, seed: int = 0) -> list[np.ndarray]:
    """Token ids of ``count`` sentences of 2–9 tokens (ids 1.., 0 is padding)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(2, 10))) for _ in range(count)]


def padded_feeds(texts: list[np.ndarray], batch: int, length: int) -> list[dict[str, np.ndarray]]:
    feeds = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        ids = np.zeros((len(chunk), length), np.int64)
        mask = np.zeros((len(chunk), length), np.int64)
        for row, tokens in enumerate(chunk):
            ids[row, : tokens.size] = tokens
            mask[row, : tokens.size] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def unpadded_feeds(texts: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [
        {
            "input_ids": tokens[None].astype(np.int64),
            "attention_mask": np.ones((1, tokens.size), np.int64),
        }
        for tokens in texts
    ]


REQUESTS = [
    StatRequest("embedded", histogram=True, channel_absmax=True, gram=True),
    StatRequest("r", channel_sumsq=True, gram=True),
    StatRequest("hidden", minmax=True),
]


def _stats(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], mask: str | None):  # type: ignore[no-untyped-def]
    model = model_from_proto(proto)
    opened = open_data(feeds, input_specs(model.graph)).with_mask_input(mask)
    return collect(model, opened, REQUESTS)


# --- layouts (rule 4) ------------------------------------------------------------------------


VALID = np.array([[1, 1, 0], [1, 0, 0]], bool)


def _seen(value: np.ndarray, axis: int | None = -1, decision: LayoutDecision | None = None):  # type: ignore[no-untyped-def]
    return (decision or LayoutDecision()).apply(RunMask(VALID), value, axis)


def test_batch_first_tensor_keeps_valid_rows() -> None:
    value = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    selected = _seen(value)
    np.testing.assert_array_equal(selected.value, value[VALID])
    assert selected.dropped == 3 and selected.channel_axis == 1  # [valid, 4]: axis 1


def test_sequence_first_and_flattened_layouts_are_masked() -> None:
    hidden = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    sequence_first = _seen(np.ascontiguousarray(hidden.transpose(1, 0, 2)))
    flattened = _seen(hidden.reshape(6, 4), 1)
    np.testing.assert_array_equal(np.sort(sequence_first.value, 0), np.sort(hidden[VALID], 0))
    np.testing.assert_array_equal(flattened.value, hidden[VALID])
    assert flattened.channel_axis == 1


def test_other_layouts_and_sequence_channels_stay_whole() -> None:
    pooled = np.ones((2, 4), np.float32)
    scores = np.ones((2, 5, 3, 3), np.float32)  # [batch, heads, seq, seq]
    for value in (pooled, scores, np.ones((2, 3), np.float32)):
        selected = _seen(value)
        assert selected.value is value and selected.dropped == 0
    # minmax only (no channel axis): a [b, s] tensor is masked
    assert _seen(np.ones((2, 3), np.float32), None).value.shape == (3,)


def test_a_mask_without_padding_selects_nothing() -> None:
    value = np.ones((2, 3, 4), np.float32)
    assert LayoutDecision().apply(RunMask(np.ones((2, 3), bool)), value, -1).value is value


def test_a_shape_coincidence_decides_nothing_and_a_clear_run_decides() -> None:
    """Attention scores [b, heads, s, s] when a batch's length equals the number of heads."""
    decision = LayoutDecision()
    twelve = RunMask(np.ones((2, 12), bool))
    twelve.valid[0, 8:] = False
    scores = np.ones((2, 12, 12, 12), np.float32)
    assert decision.apply(twelve, scores, None).value is scores  # [b, s, …]? or heads? unknown
    assert decision.decided is None
    later = np.ones((2, 12, 5, 5), np.float32)  # a batch of 5 tokens: clearly not [b, s, …]
    assert decision.apply(RunMask(VALID), later, None).value is later
    assert decision.decided == "whole"
    assert decision.apply(twelve, scores, None).value is scores
    hidden = LayoutDecision()
    assert hidden.apply(twelve, np.ones((2, 12, 384), np.float32), -1).dropped == 4
    assert hidden.decided == "batch_first"


def test_a_fixed_axis_in_the_graph_rules_a_layout_out() -> None:
    """A Conv map [1, 6, 10, 10] beside a padded [1, 6] mask: 6 channels, not 6 positions."""
    valid = np.array([[1, 1, 1, 1, 0, 0]], bool)
    feature_map = np.ones((1, 6, 10, 10), np.float32)
    conv = LayoutDecision(inferred=["N", 6, "H", "W"], mask_dims=["batch", "sequence"])
    assert conv.apply(RunMask(valid), feature_map, None).value is feature_map
    assert conv.decided == "whole"
    tokens = LayoutDecision(inferred=["batch", "sequence", 6], mask_dims=["batch", "sequence"])
    assert tokens.apply(RunMask(valid), np.ones((1, 6, 6), np.float32), None).dropped == 0
    assert tokens.apply(RunMask(valid), np.ones((1, 6, 8), np.float32), -1).dropped == 2


# --- statistics (collector rule 8) -----------------------------------------------------------


def test_masked_statistics_equal_those_of_the_unpadded_sentences() -> None:
    proto, texts = token_model(), sentences()
    padded = padded_feeds(texts, batch=4, length=16)
    expected = _stats(proto, unpadded_feeds(texts), None)
    masked = _stats(proto, padded, "attention_mask")
    unmasked = _stats(proto, padded, None)
    for name in ("embedded", "r"):
        np.testing.assert_allclose(masked[name].gram, expected[name].gram, rtol=1e-5)
        assert not np.allclose(unmasked[name].gram, expected[name].gram, rtol=1e-2)
    np.testing.assert_allclose(masked["r"].channel_sumsq, expected["r"].channel_sumsq, rtol=1e-5)
    np.testing.assert_array_equal(
        masked["embedded"].channel_absmax, expected["embedded"].channel_absmax
    )
    # histogram bin edges depend on how values are grouped (collector rule 3); counts do not
    assert masked["embedded"].histogram.counts.sum() == expected["embedded"].count
    assert (masked["hidden"].minimum, masked["hidden"].maximum) == (
        expected["hidden"].minimum,
        expected["hidden"].maximum,
    )
    assert masked["r"].rows == expected["r"].rows == sum(t.size for t in texts)
    padding = 3 * 4 * 16 - sum(t.size for t in texts)
    assert masked["r"].padding == padding and unmasked["r"].padding == 0
    assert masked["hidden"].padded_values == padding * HIDDEN  # what the model computed anyway
    assert masked["hidden"].count + masked["hidden"].padded_values == unmasked["hidden"].count


def test_collect_logs_how_many_positions_were_padding(caplog: pytest.LogCaptureFixture) -> None:
    proto, texts = token_model(), sentences()
    with caplog.at_level(logging.INFO, logger="graphopt.data.calibration"):
        _stats(proto, padded_feeds(texts, batch=4, length=16), "attention_mask")
    padding = 3 * 4 * 16 - sum(t.size for t in texts)
    assert f"marks {padding} of 192 positions as padding" in caplog.text


def test_run_mask_ignores_feeds_without_the_input() -> None:
    assert run_mask({"x": np.ones((2, 3))}, "attention_mask") is None
    assert run_mask({"attention_mask": np.ones((2, 3))}, None) is None


# --- which input is the mask (rules 1-3) -----------------------------------------------------


def _feeds(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    specs = input_specs(model_from_proto(proto).graph)
    return open_data(feeds, specs), specs


def test_an_attention_mask_is_found_by_name_and_values() -> None:
    proto = token_model()
    feeds, specs = _feeds(proto, padded_feeds(sentences(), 4, 16))
    summary = resolve_mask_input(feeds, specs)
    assert summary is not None and summary.input == "attention_mask"
    assert summary.positions == 192 and summary.padding == 192 - sum(t.size for t in sentences())
    assert "are padding" in summary.describe()
    assert resolve_mask_input(feeds, specs, False) is None


def test_a_mask_named_like_padding_or_with_other_values_is_not_guessed() -> None:
    proto = token_model("key_padding_mask")
    data = [
        {"input_ids": f["input_ids"], "key_padding_mask": f["attention_mask"]}
        for f in padded_feeds(sentences(), 4, 16)
    ]
    feeds, specs = _feeds(proto, data)
    assert resolve_mask_input(feeds, specs) is None
    assert resolve_mask_input(feeds, specs, "key_padding_mask").input == "key_padding_mask"
    counts = [
        dict(f, attention_mask=f["attention_mask"] * 2) for f in padded_feeds(sentences(), 4, 16)
    ]
    feeds, specs = _feeds(token_model(), counts)
    assert resolve_mask_input(feeds, specs) is None
    with pytest.raises(DataError, match="values other than 0 and 1"):
        resolve_mask_input(feeds, specs, "attention_mask")


def test_a_causal_mask_is_not_taken_for_a_padding_mask() -> None:
    """A [s, s] bool ``src_mask`` (True = blocked) shares no [batch, sequence] with the ids."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    causal = helper.make_tensor_value_info("src_mask", TensorProto.BOOL, ["seq", "seq"])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "seq"])
    proto = make_model([helper.make_node("Identity", ["input_ids"], ["y"])], [ids, causal], [out])
    feeds = [
        {"input_ids": np.ones((2, 6), np.int64), "src_mask": np.triu(np.ones((6, 6), bool), 1)}
    ]
    opened, specs = _feeds(proto, feeds)
    assert resolve_mask_input(opened, specs) is None


def test_an_input_of_unknown_rank_is_not_a_mask_candidate() -> None:
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    unknown = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, None)
    out = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "seq"])
    proto = make_model([helper.make_node("Identity", ["input_ids"], ["y"])], [ids, unknown], [out])
    opened, specs = _feeds(proto, padded_feeds(sentences(), 4, 16))
    assert resolve_mask_input(opened, specs) is None
    assert resolve_mask_input(opened, specs, "attention_mask").input == "attention_mask"


def test_naming_a_mask_that_is_not_a_rank_2_input_is_an_error() -> None:
    feeds, specs = _feeds(token_model(), padded_feeds(sentences(), 4, 16))
    with pytest.raises(DataError, match="not a model input"):
        resolve_mask_input(feeds, specs, "mask")
    with pytest.raises(OptionError, match="mask_input must be"):
        resolve_mask_input(feeds, specs, True)


# --- the pipeline and the CLI ------------------------------------------------------------------


def _folder(tmp_path: Path, feeds: list[dict[str, np.ndarray]], name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index:03d}.npz", **feed)
    return folder


def _factors(path: Path) -> dict[str, np.ndarray]:
    graph = load_model(path).graph
    return {
        name: np.asarray(tensor.values)
        for name, tensor in graph.tensors().items()
        if hasattr(tensor, "values") and name.startswith(("W1", "W2"))
    }


def test_lowrank_calibrated_on_padded_batches_matches_unpadded(tmp_path: Path) -> None:
    proto, texts = token_model(), sentences(24)
    source = tmp_path / "tokens.onnx"
    onnx.save(proto, source)
    padded = _folder(tmp_path, padded_feeds(texts, 4, 16), "padded")
    unpadded = _folder(tmp_path, unpadded_feeds(texts), "unpadded")
    options = {"lowrank": {"rank": 4, "method": "whiten", "min_size": 1}}
    reports = {}
    for name, data, mask in (
        ("padded", padded, None),
        ("unpadded", unpadded, None),
        ("unmasked", padded, False),
    ):
        reports[name] = optimize(
            source,
            tmp_path / f"{name}.onnx",
            ["lowrank"],
            options=options,
            data=data,
            validate=False,
            mask_input=mask,
        )
    padded_factors, unpadded_factors = (
        _factors(tmp_path / f"{n}.onnx") for n in ("padded", "unpadded")
    )
    assert padded_factors.keys() == unpadded_factors.keys() and padded_factors
    for name, values in padded_factors.items():
        np.testing.assert_allclose(values, unpadded_factors[name], rtol=1e-3, atol=1e-4)
    unmasked = _factors(tmp_path / "unmasked.onnx")
    assert any(not np.allclose(unmasked[n], v, rtol=1e-2) for n, v in padded_factors.items())
    assert "attention_mask" in reports["padded"].calibration_mask
    assert reports["unmasked"].calibration_mask is None
    assert reports["padded"].to_dict()["calibration_mask"] == reports["padded"].calibration_mask


def test_cli_reports_the_mask_and_turns_it_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "tokens.onnx"
    onnx.save(token_model(), source)
    data = _folder(tmp_path, padded_feeds(sentences(), 4, 16), "padded")
    args = ["optimize", str(source), str(tmp_path / "q.onnx"), "--passes", "quant"]
    code, out, _ = run_cli([*args, "--calib-data", str(data), "--no-validate"], capsys)
    assert code == 0 and "mask attention_mask:" in out
    code, out, _ = run_cli(
        [*args, "--calib-data", str(data), "--no-validate", "--mask-input", "none"], capsys
    )
    assert code == 0 and "mask attention_mask" not in out
    code, _, err = run_cli([*args, "--calib-data", str(data), "--mask-input", "input_idz"], capsys)
    assert code == 2 and "--mask-input input_idz: not a model input" in err


def test_per_channel_statistics_refuse_a_channel_count_that_changes() -> None:
    from graphopt.data.calibration import TensorStats

    stats = TensorStats("t")
    request = StatRequest("t", channel_absmax=True, gram=True)
    stats.update(np.ones((2, 4), np.float32), request)
    with pytest.raises(DataError, match="t has 3 channels on axis -1 in one feed and 4"):
        stats.update(np.ones((2, 3), np.float32), request)


def test_tune_passes_the_mask_to_every_build_and_into_the_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphopt.tuning.search import tune

    source = tmp_path / "tokens.onnx"
    onnx.save(token_model(), source)
    data = _folder(tmp_path, padded_feeds(sentences(24), 4, 16), "padded")
    results = {}
    for label, mask in (("auto", None), ("off", False)):
        results[label] = tune(
            source,
            tmp_path / label,
            calib_data=data,
            passes=["lowrank"],
            budget=1,
            workers=0,
            min_cosine=0.01,
            options={"lowrank": {"min_size": 1, "rank": 4}},
            mask_input=mask,
        )
    auto, off = results["auto"].chosen, results["off"].chosen
    assert auto is not None and off is not None
    assert auto.candidate == off.candidate and auto.key != off.key  # the mask is in the key
    # each build used its own mask: the same candidate, other factors
    assert (
        Path(results["auto"].files["best"]).read_bytes()
        != Path(results["off"].files["best"]).read_bytes()
    )
    recipe = json.loads(Path(results["off"].files["recipe"]).read_text())
    assert recipe["mask_input"] == "none"
    assert "mask_input" not in json.loads(Path(results["auto"].files["recipe"]).read_text())
    rebuilt = tmp_path / "rebuilt.onnx"
    arguments = ["optimize", str(source), str(rebuilt), "--recipe", results["off"].files["recipe"]]
    code, out, _ = run_cli([*arguments, "--calib-data", str(data), "--no-validate"], capsys)
    assert code == 0 and "mask attention_mask" not in out
    assert rebuilt.read_bytes() == Path(results["off"].files["best"]).read_bytes()


def test_tune_refuses_a_mask_input_that_is_not_an_input_before_searching(
    tmp_path: Path,
) -> None:
    from graphopt.tuning.search import tune

    source = tmp_path / "tokens.onnx"
    onnx.save(token_model(), source)
    data = _folder(tmp_path, padded_feeds(sentences(), 4, 16), "padded")
    with pytest.raises(DataError, match="--mask-input attention_msk: not a model input"):
        tune(
            source,
            tmp_path / "out",
            calib_data=data,
            passes=["lowrank"],
            workers=0,
            mask_input="attention_msk",
        )
    assert not (tmp_path / "out").exists()


def test_a_later_feed_with_longer_samples_is_measured_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Collector rule 6 with varying shapes: the output budget holds for the longest feed, and
    shorter feeds reuse a measurement instead of probing again."""
    import onnxruntime as ort

    from graphopt.settings import Settings

    runs: list[tuple[int, ...]] = []
    original = ort.InferenceSession.run

    def counted(self, names, feed, *args, **kwargs):  # type: ignore[no-untyped-def]
        runs.append(tuple(feed["input_ids"].shape))
        return original(self, names, feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counted)
    model = model_from_proto(token_model())
    rng = np.random.default_rng(0)
    shapes = [(8, 4), (8, 16), (8, 8), (8, 4)]
    data = [
        {
            "input_ids": rng.integers(1, VOCAB, size=shape).astype(np.int64),
            "attention_mask": np.ones(shape, np.int64),
        }
        for shape in shapes
    ]
    feeds = open_data(data, input_specs(model.graph))
    budget = Settings(calibration_output_bytes=2 * 16 * HIDDEN * 4)  # 2 samples of 16 tokens
    collect(model, feeds, [StatRequest("hidden")], settings=budget)
    probes = [shape for shape in runs if shape[0] == 1]
    assert probes == [(1, 4), (1, 16)]  # the first feed, then the first longer one only
    assert max(shape[0] for shape in runs if shape[1] == 16) == 2
    assert max(shape[0] for shape in runs if shape[1] == 8) == 2  # measured on a longer feed


def _with_hidden_output(proto: onnx.ModelProto, padding_noise: float) -> onnx.ModelProto:
    """The token model also returning ``hidden`` [b, s, 8], plus ``padding_noise`` at padding
    positions (what a compressed model's padding outputs may do: nobody reads them)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    graph.node.extend(
        [
            helper.make_node("Sub", ["one_f", "mask3"], ["padding3"]),
            helper.make_node("Mul", ["padding3", "noise"], ["offset"]),
            helper.make_node("Add", ["hidden", "offset"], ["hidden_out"]),
        ]
    )
    graph.initializer.extend(
        [
            helper.make_tensor("one_f", TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor("noise", TensorProto.FLOAT, [], [padding_noise]),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, ["batch", "seq", HIDDEN])
    )
    return model


def test_validation_compares_valid_positions_only(tmp_path: Path) -> None:
    from graphopt.check.validate import compare_models

    reference = tmp_path / "reference.onnx"
    candidate = tmp_path / "candidate.onnx"
    onnx.save(_with_hidden_output(token_model(), 0.0), reference)
    onnx.save(_with_hidden_output(token_model(), 5.0), candidate)
    specs = input_specs(model_from_proto(token_model()).graph)
    feeds = open_data(padded_feeds(sentences(), 4, 16), specs)
    masked = compare_models(reference, candidate, feeds.with_mask_input("attention_mask"))
    whole = compare_models(reference, candidate, feeds)
    by_output = {c.output: c for c in masked.comparisons}
    assert masked.passed and by_output["hidden_out"].cosine == pytest.approx(1.0)
    assert not whole.passed
    assert {c.output: c for c in whole.comparisons}["hidden_out"].cosine < 0.99


def test_check_uses_the_mask_and_turns_it_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = tmp_path / "reference.onnx"
    candidate = tmp_path / "candidate.onnx"
    onnx.save(_with_hidden_output(token_model(), 0.0), reference)
    onnx.save(_with_hidden_output(token_model(), 5.0), candidate)
    data = _folder(tmp_path, padded_feeds(sentences(), 4, 16), "padded")
    args = ["check", str(reference), str(candidate), "--data", str(data)]
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "mask attention_mask:" in out
    code, out, _ = run_cli([*args, "--mask-input", "none"], capsys)
    assert code == 1 and "mask attention_mask" not in out


def test_quant_counts_padding_as_computed_work(tmp_path: Path) -> None:
    """Rule 11 of quant (MACs per sample) counts every position a padded batch computes, not
    only the valid ones the statistics keep: serving runs the padding too."""
    source = tmp_path / "tokens.onnx"
    onnx.save(token_model(), source)
    data = _folder(tmp_path, padded_feeds(sentences(), 4, 16), "padded")
    valid = sum(t.size for t in sentences()) / 12 * HIDDEN * 64  # mm1's MACs at valid positions
    computed = 16 * HIDDEN * 64
    assert valid < 5000 < computed
    report = optimize(
        source,
        tmp_path / "q.onnx",
        ["quant"],
        options={"quant": {"min_macs": 5000, "target_cosine": 0}},
        data=data,
        validate=False,
    )
    assert report.calibration_mask is not None
    stats = report.run.records[0].stats
    assert stats["quantized"] == 2, stats  # mm1 and mm2, both computed at 16 positions
