"""Experiment configuration: parsing, validation messages, stable analysis ids."""

from __future__ import annotations

import pytest

from mechdelta.errors import ConfigError
from mechdelta.runs.experiment import AnalysisSpec, Experiment

BASE = """
name = "t"
[pair]
builtin = "tiny"
[[analyses]]
kind = "shift"
"""


def _exp(extra: str = "", base: str = BASE) -> Experiment:
    return Experiment.from_toml(base + extra)


def test_minimal_experiment_fills_defaults():
    exp = _exp()
    assert exp.ids == ("shift",)
    d = exp.to_dict()
    assert d["run"] == {"seed": 0, "n_boot": 2000, "alpha": 0.05}
    assert d["output"]["figures"] == ["html", "png"]
    assert d["pair"]["builtin"] == "tiny"


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("[run]\nseeds = 1\n", "[run]: unknown key 'seeds'; allowed keys: seed, n_boot, alpha"),
        ("[output]\nformat = ['html']\n", "[output]: unknown key 'format'"),
        (
            "[[analyses]]\nkind = 'sweep'\ncomponent = 'head_out'\nlayer = [0]\n",
            "unknown key 'layer'",
        ),
        ("[[analyses]]\nkind = 'shift'\ncomponent = 'head_out'\n", "unknown key 'component'"),
        ("[[analyses]]\nkind = 'sweeps'\n", "unknown kind 'sweeps'"),
        ("[[analyses]]\nkind = 'sweep'\n", "needs component"),
        ("[[analyses]]\nkind = 'sweep'\ncomponent = 'head_outt'\n", "unknown component"),
        (
            "[[analyses]]\nkind = 'sweep'\ncomponent = 'head_out'\ndirection = 'up'\n",
            "unknown direction",
        ),
        ("[[analyses]]\nkind = 'sweep'\ncomponent = 'head_out'\nlayers = [0, 0]\n", "duplicates"),
        (
            "[[analyses]]\nkind = 'sweep'\ncomponent = 'head_out'\nlayers = 'all'\n",
            "list of integers",
        ),
        ("[[analyses]]\nkind = 'patch'\nsites = ['X9']\n", "cannot parse site 'X9'"),
        ("[[analyses]]\nkind = 'patch'\nsites = []\n", "needs sites"),
        ("[[analyses]]\nkind = 'shift'\n", "same id 'shift'"),
        ("[[analyses]]\nkind = 'shift'\nname = 'a/b'\n", "name 'a/b'"),
        ("[run]\nn_boot = 10\n", "n_boot must be >= 100"),
        ("[run]\nalpha = 1.5\n", "alpha must lie in (0, 1)"),
        ("[run]\nseed = true\n", "seed must be an integer"),
        ("[output]\nfigures = ['gif']\n", "unknown format 'gif'"),
    ],
)
def test_invalid_configs_name_the_problem(extra, needle):
    with pytest.raises(ConfigError) as err:
        _exp(extra)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "pair, needle",
    [
        ("zoo = 'induction'\nbuiltin = 'tiny'", "exactly one source"),
        ("reference = 'a'", "must be given together"),
        ("builtin = 'huge'", "builtin = 'huge' is unknown"),
        ("zoo = 'induction'\nprocessing = 'compat'", "processing applies to reference/intervened"),
        ("reference = 'a'\nintervened = 'b'\nprocessing = 'folded'", "'raw' or 'compat'"),
        ("zoo = 'induction'\nweights = 'x'", "[pair]: unknown key 'weights'"),
    ],
)
def test_pair_validation(pair, needle):
    with pytest.raises(ConfigError) as err:
        Experiment.from_toml(f"[pair]\n{pair}\n[[analyses]]\nkind = 'shift'\n")
    assert needle in str(err.value)


def test_checkpoints_need_a_task_and_task_is_checked():
    text = "[pair]\nreference = 'a'\nintervened = 'b'\n[[analyses]]\nkind = 'shift'\n"
    with pytest.raises(ConfigError, match=r"\[task\] is required"):
        Experiment.from_toml(text)
    with pytest.raises(ConfigError, match="answers has 1 entries for 2 prompts"):
        Experiment.from_toml(text + "[task]\nprompts = ['a', 'b']\nanswers = [' c']\n")
    with pytest.raises(ConfigError, match="unknown metric"):
        Experiment.from_toml(text + "[task]\nprompts = ['a']\nmetric = 'accuracy'\n")
    exp = Experiment.from_toml(
        text + "[task]\nprompts = ['a b', [1, 2]]\nmetric = 'kl_to_reference'\n"
    )
    task = exp.task.build()
    assert task.prompts == ["a b", [1, 2]] and task.metric_spec.name == "kl_to_reference"


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"top level\): unknown key 'colour'; allowed keys: name"):
        _exp(base="colour = 1\n" + BASE)


def test_bad_toml_is_a_config_error(tmp_path):
    p = tmp_path / "e.toml"
    p.write_text("[pair\nzoo = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Experiment.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        Experiment.load(tmp_path / "missing.toml")


def test_analysis_ids_are_derived_and_stable():
    exp = _exp(
        """
[[analyses]]
kind = "sweep"
component = "head_out"
direction = "both"
[[analyses]]
kind = "sweep"
component = "head_out"
[[analyses]]
kind = "sweep"
component = "resid_pre"
positions = [0, 2]
layers = [1]
batch_budget = 8
[[analyses]]
kind = "patch"
sites = ["L1H2", "L0H1.head_z"]
direction = "i->r"
[[analyses]]
kind = "weight_diff"
[[analyses]]
kind = "factorial"
name = "two-by-two"
"""
    )
    ids = exp.ids
    assert ids[:3] == ("shift", "sweep-head_out-both", "sweep-head_out-r2i")
    assert (
        ids[3].startswith("sweep-resid_pre-r2i-pos-")
        and len(ids[3]) == len("sweep-resid_pre-r2i-pos-") + 8
    )
    assert ids[4:] == ("patch-L1H2+L0H1.head_z-i2r", "weight_diff", "two-by-two")
    # batch_budget does not change results, so it does not change the id
    other = AnalysisSpec("sweep", component="resid_pre", positions=(0, 2), layers=(1,))
    assert other.id == ids[3]
    assert AnalysisSpec("sweep", component="resid_pre", positions=(0, 3), layers=(1,)).id != ids[3]
    # the same text parses to the same ids every time, and survives the manifest round trip
    assert _exp().ids == ("shift",)
    again = Experiment.from_resolved(exp.to_dict())
    assert again.ids == ids and again.compute_dict() == exp.compute_dict()


def test_long_patch_site_lists_get_a_hashed_id():
    sites = [f"L{i % 2}H{i % 4}P{i}" for i in range(12)]
    spec = AnalysisSpec("patch", sites=tuple(sites))
    assert spec.id.startswith("patch-12sites-r2i-") and len(spec.id) <= 80


def test_packaged_demo_parses():
    exp = Experiment.packaged("demo")
    assert exp.pair.zoo == "induction"
    assert [a.kind for a in exp.analyses] == ["shift", "weight_diff", "sweep"]
    assert exp.analyses[2].direction == "both"
    with pytest.raises(ConfigError, match="no packaged experiment"):
        Experiment.packaged("nope")


def test_examples_parse():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
    assert len(examples) >= 2
    for path in examples:
        exp = Experiment.load(path)
        assert exp.analyses and exp.name == exp.to_dict()["name"]


def test_a_control_pair_is_specified_like_the_pair():
    exp = _exp('[control]\nzoo = "null"\n')
    assert exp.control is not None and exp.control.zoo == "null"
    assert exp.control.label == "zoo:null"
    d = exp.to_dict()
    assert d["control"]["zoo"] == "null" and "where" not in d["control"]
    assert exp.compute_dict()["control"] == d["control"]
    assert Experiment.from_resolved(d) == exp  # as stored in a run's manifest
    plain = _exp()
    assert plain.control is None and plain.to_dict()["control"] is None
    assert Experiment.from_resolved(plain.to_dict()) == plain
    ckpt = _exp("[control]\nreference = 'a'\nintervened = 'b'\ndtype = 'float32'\n")
    assert ckpt.control is not None and ckpt.control.label == "a vs b"


@pytest.mark.parametrize(
    "control, needle",
    [
        ("zoo = 'null'\nbuiltin = 'tiny'", "[control] needs exactly one source"),
        ("reference = 'a'", "[control] reference and intervened must be given together"),
        ("zoo = 'null'\nweights = 'x'", "[control]: unknown key 'weights'"),
        ("zoo = 'null'\ndevice = 'cpu'", "[control] device applies to reference/intervened"),
    ],
)
def test_control_validation_names_the_control_table(control, needle):
    with pytest.raises(ConfigError) as err:
        _exp(f"[control]\n{control}\n")
    assert needle in str(err.value)
