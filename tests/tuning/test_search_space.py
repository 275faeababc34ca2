"""What ``graphopt tune`` searches comes from the passes' own declarations (issue 17, item 3).

The snapshot :data:`EXPECTED` was printed by the search code of commit fad609c, where ``tune``
listed every built-in pass's settings by hand: the declarations next to the option schemas must
give the same settings, with the same objectives, in the same order, and the same stage-1
candidates in the same order, for both objectives, with and without ``-o`` options. A plugin's
declaration is searched like a built-in one, and a declaration that names an option the pass
does not have (a renamed option) is an error, never a silently dropped setting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from graphopt.errors import InputError
from graphopt.passkit.options import (
    OBJECTIVES,
    BarCosine,
    Option,
    SearchPoint,
    SearchSpace,
    sweep,
)
from graphopt.passkit.registry import BUILTIN_PASSES, load_pass_class
from graphopt.tuning.executor import SerialExecutor
from graphopt.tuning.search import (
    LATENCY_TIE,
    Setting,
    build_search_space,
    choose,
    sensitivity_order,
    tune,
)

from ..conftest import REPO_ROOT, install_plugin, relu_mlp
from .trials import timed_trial

TEST_OPTIONS = {"quant": {"min_macs": 0}, "lowrank": {"min_size": 0}}
OVERRIDES = {
    "cleanup": {"fold_shapes": False},
    "lowrank": {"rank": 8},  # rank and energy exclude each other: the energy setting is skipped
    "quant": {"calibrator": "mse", "target_cosine": 0.995},  # merges most quant settings
    "sparsify": {"pattern": "channel", "report_gzip": True},
}
CONFIGS: dict[str, tuple[tuple[str, ...], float, dict[str, dict[str, Any]]]] = {
    "all passes, bar 0.99": (tuple(BUILTIN_PASSES), 0.99, {}),
    "all passes, bar 0.98, test options": (tuple(BUILTIN_PASSES), 0.98, TEST_OPTIONS),
    "bar that does not round": (("quant", "fp16"), 0.9999995, {}),
    "options override and invalidate settings": (
        ("sparsify", "lowrank", "quant", "cleanup"),
        0.95,
        OVERRIDES,
    ),
}
"""Search arguments (passes, bar, ``-o`` options) the snapshot was taken with."""

EXPECTED: dict[str, dict[str, Any]] = {
    "all passes, bar 0.99": {
        "base": {"cleanup": {}},
        "lossy": ["fp16", "lowrank", "quant", "sparsify"],
        "settings": {
            "fp16": [(("size",), {})],
            "lowrank": [
                (("latency", "size"), {"ratio": 0.9}),
                (("latency", "size"), {}),
                (("latency", "size"), {"ratio": 0.5}),
                (("latency", "size"), {"energy": 0.99}),
            ],
            "quant": [
                (("latency", "size"), {}),
                (("latency", "size"), {"target_cosine": 0.995}),
                (("latency", "size"), {"fallback": "dynamic"}),
                (("latency", "size"), {"smooth_outliers": True}),
                (("latency", "size"), {"calibrator": "entropy"}),
                (("latency", "size"), {"calibrator": "mse"}),
                (("latency", "size"), {"mode": "dynamic"}),
                (("latency", "size"), {"calibrator": "minmax"}),
                (("latency", "size"), {"backend": "tensorrt"}),
            ],
            "sparsify": [
                ((), {"report_gzip": False, "sparsity": 0.3}),
                (
                    ("latency", "size"),
                    {"pattern": "channel", "report_gzip": False, "sparsity": 0.25},
                ),
                ((), {"report_gzip": False}),
                ((), {"pattern": "n:m", "report_gzip": False}),
                ((), {"method": "wanda", "report_gzip": False, "sparsity": 0.3}),
            ],
        },
        "size": [
            "fp16#0",
            "lowrank#0",
            "quant#0",
            "sparsify#1",
            "lowrank#1",
            "quant#1",
            "lowrank#2",
            "quant#2",
            "lowrank#3",
            "quant#3",
            "quant#4",
            "quant#5",
            "quant#6",
            "quant#7",
            "quant#8",
            "sparsify#0",
            "sparsify#2",
            "sparsify#3",
            "sparsify#4",
        ],
        "size sha256": "e15e48523988c70e39dc9b2fa27e938bc567324c859df10834cc188f5f0c8b2f",
        "latency": [
            "lowrank#0",
            "quant#0",
            "sparsify#1",
            "lowrank#1",
            "quant#1",
            "lowrank#2",
            "quant#2",
            "lowrank#3",
            "quant#3",
            "quant#4",
            "quant#5",
            "quant#6",
            "quant#7",
            "quant#8",
            "fp16#0",
            "sparsify#0",
            "sparsify#2",
            "sparsify#3",
            "sparsify#4",
        ],
        "latency sha256": "152c7c8725ab95ce7d694031542d0d01460a496dde0bba3df0bbe8580e50bf2e",
    },
    "all passes, bar 0.98, test options": {
        "base": {"cleanup": {}},
        "lossy": ["fp16", "lowrank", "quant", "sparsify"],
        "settings": {
            "fp16": [(("size",), {})],
            "lowrank": [
                (("latency", "size"), {"min_size": 0, "ratio": 0.9}),
                (("latency", "size"), {"min_size": 0}),
                (("latency", "size"), {"min_size": 0, "ratio": 0.5}),
                (("latency", "size"), {"energy": 0.99, "min_size": 0}),
            ],
            "quant": [
                (("latency", "size"), {"min_macs": 0.0, "target_cosine": 0.98}),
                (("latency", "size"), {"min_macs": 0.0}),
                (
                    ("latency", "size"),
                    {"fallback": "dynamic", "min_macs": 0.0, "target_cosine": 0.98},
                ),
                (
                    ("latency", "size"),
                    {"min_macs": 0.0, "smooth_outliers": True, "target_cosine": 0.98},
                ),
                (
                    ("latency", "size"),
                    {"calibrator": "entropy", "min_macs": 0.0, "target_cosine": 0.98},
                ),
                (
                    ("latency", "size"),
                    {"calibrator": "mse", "min_macs": 0.0, "target_cosine": 0.98},
                ),
                (("latency", "size"), {"min_macs": 0.0, "mode": "dynamic", "target_cosine": 0.98}),
                (
                    ("latency", "size"),
                    {"calibrator": "minmax", "min_macs": 0.0, "target_cosine": 0.98},
                ),
                (
                    ("latency", "size"),
                    {"backend": "tensorrt", "min_macs": 0.0, "target_cosine": 0.98},
                ),
            ],
            "sparsify": [
                ((), {"report_gzip": False, "sparsity": 0.3}),
                (
                    ("latency", "size"),
                    {"pattern": "channel", "report_gzip": False, "sparsity": 0.25},
                ),
                ((), {"report_gzip": False}),
                ((), {"pattern": "n:m", "report_gzip": False}),
                ((), {"method": "wanda", "report_gzip": False, "sparsity": 0.3}),
            ],
        },
        "size": [
            "fp16#0",
            "lowrank#0",
            "quant#0",
            "sparsify#1",
            "lowrank#1",
            "quant#1",
            "lowrank#2",
            "quant#2",
            "lowrank#3",
            "quant#3",
            "quant#4",
            "quant#5",
            "quant#6",
            "quant#7",
            "quant#8",
            "sparsify#0",
            "sparsify#2",
            "sparsify#3",
            "sparsify#4",
        ],
        "size sha256": "b5746ed87c18f81eeee020ff4fd19155d38c11b7725622130d31e0e15e22d527",
        "latency": [
            "lowrank#0",
            "quant#0",
            "sparsify#1",
            "lowrank#1",
            "quant#1",
            "lowrank#2",
            "quant#2",
            "lowrank#3",
            "quant#3",
            "quant#4",
            "quant#5",
            "quant#6",
            "quant#7",
            "quant#8",
            "fp16#0",
            "sparsify#0",
            "sparsify#2",
            "sparsify#3",
            "sparsify#4",
        ],
        "latency sha256": "be67b58bcdd63617efa2ce2c93e3810d2ded7e8182a46961b494c90d9812d565",
    },
    "bar that does not round": {
        "base": {},
        "lossy": ["quant", "fp16"],
        "settings": {
            "quant": [
                (("latency", "size"), {"target_cosine": 0.9999995}),
                (("latency", "size"), {"target_cosine": 1.0}),
                (("latency", "size"), {"fallback": "dynamic", "target_cosine": 0.9999995}),
                (("latency", "size"), {"smooth_outliers": True, "target_cosine": 0.9999995}),
                (("latency", "size"), {"calibrator": "entropy", "target_cosine": 0.9999995}),
                (("latency", "size"), {"calibrator": "mse", "target_cosine": 0.9999995}),
                (("latency", "size"), {"mode": "dynamic", "target_cosine": 0.9999995}),
                (("latency", "size"), {"calibrator": "minmax", "target_cosine": 0.9999995}),
                (("latency", "size"), {"backend": "tensorrt", "target_cosine": 0.9999995}),
            ],
            "fp16": [(("size",), {})],
        },
        "size": [
            "quant#0",
            "fp16#0",
            "quant#1",
            "quant#2",
            "quant#3",
            "quant#4",
            "quant#5",
            "quant#6",
            "quant#7",
            "quant#8",
        ],
        "size sha256": "43db29ca9d1bcc6b779744bf3e91a58026fe3d03f814b337502158fb2ab48222",
        "latency": [
            "quant#0",
            "quant#1",
            "quant#2",
            "quant#3",
            "quant#4",
            "quant#5",
            "quant#6",
            "quant#7",
            "quant#8",
            "fp16#0",
        ],
        "latency sha256": "75e0199225cdc60c32325cbb43d56c1188c947e698304e4ad93a69cc420f74a0",
    },
    "options override and invalidate settings": {
        "base": {"cleanup": {"fold_shapes": False}},
        "lossy": ["sparsify", "lowrank", "quant"],
        "settings": {
            "sparsify": [
                ((), {"pattern": "channel", "sparsity": 0.3}),
                (("latency", "size"), {"pattern": "channel", "sparsity": 0.25}),
                ((), {"pattern": "channel"}),
                ((), {"method": "wanda", "pattern": "channel", "sparsity": 0.3}),
            ],
            "lowrank": [
                (("latency", "size"), {"rank": 8, "ratio": 0.9}),
                (("latency", "size"), {"rank": 8}),
                (("latency", "size"), {"rank": 8, "ratio": 0.5}),
            ],
            "quant": [
                (("latency", "size"), {"calibrator": "mse", "target_cosine": 0.995}),
                (
                    ("latency", "size"),
                    {"calibrator": "mse", "fallback": "dynamic", "target_cosine": 0.995},
                ),
                (
                    ("latency", "size"),
                    {"calibrator": "mse", "smooth_outliers": True, "target_cosine": 0.995},
                ),
                (
                    ("latency", "size"),
                    {"calibrator": "mse", "mode": "dynamic", "target_cosine": 0.995},
                ),
                (
                    ("latency", "size"),
                    {"backend": "tensorrt", "calibrator": "mse", "target_cosine": 0.995},
                ),
            ],
        },
        "size": [
            "sparsify#1",
            "lowrank#0",
            "quant#0",
            "lowrank#1",
            "quant#1",
            "lowrank#2",
            "quant#2",
            "quant#3",
            "quant#4",
            "sparsify#0",
            "sparsify#2",
            "sparsify#3",
        ],
        "size sha256": "52f542b11f8befa58c926537352db94a89f710c22b085649bc085b6737d9f47e",
        "latency": [
            "sparsify#1",
            "lowrank#0",
            "quant#0",
            "lowrank#1",
            "quant#1",
            "lowrank#2",
            "quant#2",
            "quant#3",
            "quant#4",
            "sparsify#0",
            "sparsify#2",
            "sparsify#3",
        ],
        "latency sha256": "52f542b11f8befa58c926537352db94a89f710c22b085649bc085b6737d9f47e",
    },
}


def _snapshot(
    names: Sequence[str], bar: float, fixed: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The search space and the stage-1 order for both objectives; ``PASS#i`` is the i-th
    setting of PASS, and the digest covers every stage-1 candidate's canonical text."""
    space = build_search_space(list(names), bar, fixed)
    settings = {
        name: [(tuple(sorted(s.helps)), s.options) for s in rows]
        for name, rows in space.settings.items()
    }
    out: dict[str, Any] = {"base": space.base, "lossy": space.lossy, "settings": settings}
    for objective in ("size", "latency"):
        order = sensitivity_order(space, objective)
        out[objective] = [f"{s.pass_name}#{space.settings[s.pass_name].index(s)}" for s, _ in order]
        text = "\n".join(candidate.canonical() for _, candidate in order)
        out[objective + " sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return out


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_built_in_search_is_unchanged(config: str) -> None:
    snapshot = _snapshot(*CONFIGS[config])
    expected = EXPECTED[config]
    assert snapshot["base"] == expected["base"]
    assert snapshot["lossy"] == expected["lossy"]
    assert list(snapshot["settings"]) == list(expected["settings"])
    for name, rows in expected["settings"].items():
        assert snapshot["settings"][name] == rows, name
    for objective in ("size", "latency"):
        assert snapshot[objective] == expected[objective], objective
        assert snapshot[objective + " sha256"] == expected[objective + " sha256"], objective


# --- the built-in declarations are held to their schemas -----------------------------------------


def _declared(name: str) -> SearchSpace:
    declared = load_pass_class(name).search_space  # type: ignore[attr-defined]
    assert isinstance(declared, SearchSpace)
    return declared


@pytest.mark.parametrize("name", [n for n in BUILTIN_PASSES if not load_pass_class(n).exact])
def test_every_searched_option_is_declared_and_no_setting_is_dropped(name: str) -> None:
    declared = _declared(name)
    schema = {option.name for option in load_pass_class(name).options_schema}
    searched = {key for point in declared.points for key in point.values} | set(declared.common)
    assert searched <= schema
    # at the defaults every declared point is one setting: none is skipped or merged away
    space = build_search_space([name], 0.99, {})
    assert len(space.settings[name]) == len(declared.points)


def test_a_renamed_option_fails_the_search_loudly(search_plugin: str) -> None:
    """RenamedQuantPass is the quant pass with ``calibrator`` renamed ``calibration``."""
    with pytest.raises(InputError, match="searches option 'calibrator', which it does not declare"):
        build_search_space(["renamedquant"], 0.99, {})
    with pytest.raises(InputError, match="pass 'typo' searches option 'strenght'"):
        build_search_space(["typo"], 0.99, {})


TUNER_WORDS = frozenset({"ratio"})
"""Tuner vocabulary that a built-in option shares by chance: ``ratio`` is a latency
measurement's field in the cache and in front.json (lowrank's option has nothing to do with it)."""


def test_tune_names_no_built_in_pass_or_option() -> None:
    """Done-when of issue 17: the tuner reads declarations and knows no pass by name."""
    options = {o.name for n in BUILTIN_PASSES for o in load_pass_class(n).options_schema}
    options -= TUNER_WORDS
    for path in sorted((REPO_ROOT / "graphopt" / "tuning").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for name in BUILTIN_PASSES:
            assert name not in text.lower(), f"{path.name} names the pass {name}"
        for option in sorted(options):
            for quoted in (f'"{option}"', f"'{option}'", f"``{option}``"):
                assert quoted not in text, f"{path.name} names the option {option}"


def test_declarations_are_checked() -> None:
    schema = (
        Option("factor", float, 1.0, "a factor", minimum=0.0, maximum=2.0),
        Option("label", str, "", "a label"),
    )
    SearchSpace(sweep("factor", (0.5, 2.0)), common={"label": "x"}).check("p", schema)
    with pytest.raises(InputError, match="factor=3.0|3.0 is out of range"):
        SearchSpace(sweep("factor", (3.0,))).check("p", schema)
    with pytest.raises(InputError, match="label at the bar, but label is not a float option"):
        SearchSpace((SearchPoint({"label": BarCosine()}),)).check("p", schema)
    with pytest.raises(InputError, match="searches option 'colour'"):
        SearchSpace(common={"colour": "red"}).check("p", schema)
    with pytest.raises(ValueError, match="unknown objective 'speed'"):
        SearchPoint({}, objectives=("speed",))
    with pytest.raises(TypeError, match="non-empty tuple of SearchPoint"):
        SearchSpace(())


def test_bar_cosine_is_the_bar_or_a_rounded_fraction_of_its_slack() -> None:
    assert BarCosine().at(0.9999995) == 0.9999995
    assert BarCosine(slack=0.5).at(0.98) == 0.99
    assert BarCosine(slack=0.5).at(0.9999995) == 1.0  # 0.99999975 rounded to 6 decimals


# --- plugins are searched like built-in passes ---------------------------------------------------

PLUGIN_MODULE = "graphopt_search_plugin"
_PLUGIN_SOURCE = """
from dataclasses import replace
from typing import ClassVar

from graphopt.passkit.api import Pass, PassResult
from graphopt.passkit.options import BarCosine, Option, SearchPoint, SearchSpace, sweep
from passes.quant import QuantPass


class DimPass(Pass):
    name: ClassVar[str] = "dim"
    summary: ClassVar[str] = "changes nothing, but declares what tune may search"
    exact: ClassVar[bool] = False
    reads_weights: ClassVar[bool] = False
    options_schema: ClassVar[tuple[Option, ...]] = (
        Option("factor", float, 1.0, "how much to dim", minimum=0.0, maximum=1.0),
        Option("floor", float, 0.0, "a cosine", minimum=0.0, maximum=1.0),
        Option("label", str, "", "a note"),
    )
    search_space: ClassVar[SearchSpace] = SearchSpace(
        points=(
            *sweep("factor", (0.9, 0.5), objectives=("size",)),
            SearchPoint({"floor": BarCosine(slack=0.5)}, objectives=()),
        ),
        common={"label": "tuned"},
        slow_on=frozenset({"cpu"}),
    )

    def call(self, model, context):
        return PassResult(model, False, {"factor": self.options["factor"]})


class TypoPass(DimPass):
    name: ClassVar[str] = "typo"
    search_space: ClassVar[SearchSpace] = SearchSpace(sweep("strenght", (0.5,)))


class RenamedQuantPass(QuantPass):
    name: ClassVar[str] = "renamedquant"
    options_schema: ClassVar[tuple[Option, ...]] = tuple(
        replace(option, name="calibration") if option.name == "calibrator" else option
        for option in QuantPass.options_schema
    )
"""


@pytest.fixture
def search_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Plugin passes with declared search spaces, installed like tests/conftest.py's plugin."""
    return install_plugin(
        tmp_path / "search_plugin_site",
        monkeypatch,
        module=PLUGIN_MODULE,
        source=_PLUGIN_SOURCE,
        passes={"dim": "DimPass", "typo": "TypoPass", "renamedquant": "RenamedQuantPass"},
    )


DIM_SETTINGS = [
    {"factor": 0.9, "label": "tuned"},
    {"factor": 0.5, "label": "tuned"},
    {"floor": 0.995, "label": "tuned"},
]
"""The plugin's declared points at bar 0.99 (the floor halfway from the bar to 1)."""


def test_a_plugin_declaration_is_its_search_space(search_plugin: str) -> None:
    space = build_search_space(["cleanup", "dim"], 0.99, {})
    assert space.base == {"cleanup": {}}
    assert [s.options for s in space.settings["dim"]] == DIM_SETTINGS
    assert [s.helps for s in space.settings["dim"]] == [
        frozenset({"size"}),
        frozenset({"size"}),
        frozenset(),
    ]
    size = [c.options["dim"] for _, c in sensitivity_order(space, "size")]
    assert size == DIM_SETTINGS
    latency = [c.options["dim"] for _, c in sensitivity_order(space, "latency")]
    assert latency == DIM_SETTINGS  # none helps latency: all in the second group, in order
    fixed = build_search_space(["dim"], 0.99, {"dim": {"label": "mine"}})
    assert [s.options["label"] for s in fixed.settings["dim"]] == ["mine"] * 3


def test_a_plugin_without_a_declaration_is_tried_at_its_defaults(installed_plugin: str) -> None:
    space = build_search_space(["noise"], 0.99, {})
    assert space.settings == {"noise": [Setting("noise", {}, frozenset(OBJECTIVES))]}


def test_tune_tries_a_plugin_s_declared_settings(search_plugin: str, tmp_path: Path) -> None:
    model = tmp_path / "mlp.onnx"
    onnx.save(relu_mlp(16, 32, 8), str(model))
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    result = tune(
        model,
        tmp_path / "out",
        calib_data=data,
        data=data,
        passes=["cleanup", "dim"],
        budget=3,
        executor=SerialExecutor(),
        latency_runs=1,
    )
    assert [t.candidate.options["dim"] for t in result.trials] == DIM_SETTINGS
    assert all(t.candidate.passes == ("cleanup", "dim") for t in result.trials)
    assert all(t.ok for t in result.trials)


def test_a_plugin_declared_slow_on_the_cpu_must_be_measured_faster(
    search_plugin: str, caplog: pytest.LogCaptureFixture
) -> None:
    plain = timed_trial(0, 0.80, 40, ("quant",))
    tied = timed_trial(1, 0.80 * (1 + LATENCY_TIE / 2), 30, ("dim", "quant"))  # smaller
    with caplog.at_level("INFO", logger="graphopt.tuning.search"):
        assert choose([plain, tied], "latency", 0.99, 100) is plain
    assert "not choosing dim + quant: dim on the CPU provider is not measured faster" in caplog.text
    assert choose([plain, tied], "latency", 0.99, 100, latency_provider="cuda") is tied
    faster = timed_trial(2, 0.70, 30, ("dim",))
    assert choose([plain, tied, faster], "latency", 0.99, 100) is faster
