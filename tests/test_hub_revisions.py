"""Hub revisions from an offline Hugging Face cache laid out by the tests (issue 15):
``ModelPair.load(name, name, reference_revision=..., intervened_revision=...)`` and
``CheckpointSeries.from_revisions``.

How the temporary cache is picked up: huggingface_hub reads ``HF_HOME`` / ``HF_HUB_CACHE`` /
``HF_HUB_OFFLINE`` from the environment once, at import, into ``huggingface_hub.constants``; it,
transformers and mechdelta read those module attributes at call time. So the fixture patches the
environment (for anything started later) *and* those attributes (and TransformerLens's own copy,
``transformer_lens.utilities.hf_utils.CACHE_DIR``); no ``cache_dir=`` is passed anywhere.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from mechdelta.circuits.series import CheckpointSeries
from mechdelta.core.pair import ModelPair
from mechdelta.errors import (
    ConfigError,
    DuplicateCheckpointsError,
    IdenticalModelsError,
    MissingRevisionError,
    ModelLoadError,
)
from tests import _builders

REPO = "acme/tiny-neox"
# revision -> seed of its weights: step3 holds step1's weights again (the known hub trap)
REVISIONS = {"step1": 0, "step2": 1, "step3": 0}


def commit_of(repo: str, revision: str) -> str:
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """``HF_HOME`` with REPO cached at REVISIONS (``main`` = step2; step2 saved as sharded
    safetensors), built once for the module (tests only read it)."""
    home = tmp_path_factory.mktemp("hf-home")
    folder = home / "hub" / ("models--" + REPO.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    tok = _builders.train_tokenizer()
    for rev, seed in REVISIONS.items():
        snapshot = folder / "snapshots" / commit_of(REPO, rev)
        shard = "20KB" if rev == "step2" else "5GB"
        _builders.hf_model("neox", len(tok), seed).save_pretrained(snapshot, max_shard_size=shard)
        tok.save_pretrained(snapshot)
        (folder / "refs" / rev).write_text(commit_of(REPO, rev))
    (folder / "refs" / "main").write_text(commit_of(REPO, "step2"))
    return home


@pytest.fixture
def hub(hub_home, tmp_path, monkeypatch) -> Path:
    """The offline hub cache ``$HF_HOME/hub`` of :func:`hub_home`, in an empty working directory."""
    import huggingface_hub.constants as hf_constants

    cache = hub_home / "hub"
    for var, value in (("HF_HOME", hub_home), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hub_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformer_lens.utilities.hf_utils.CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)  # no local directory shadows the hub name
    return cache


def test_one_name_at_two_revisions_loads_offline(hub):
    from transformers import AutoModelForCausalLM

    snap2 = hub / "models--acme--tiny-neox" / "snapshots" / commit_of(REPO, "step2")
    assert (snap2 / "model.safetensors.index.json").is_file()  # sharded
    pair = ModelPair.load(
        REPO, REPO, reference_revision="step1", intervened_revision="step2", device="cpu"
    )
    assert pair.names == (f"{REPO}@step1", f"{REPO}@step2")
    assert pair.reference_hash != pair.intervened_hash
    tokens = pair.reference.to_tokens(["the cat sat on the mat", "hello world"])
    for model, rev in ((pair.reference, "step1"), (pair.intervened, "step2")):
        snapshot = snap2.parent / commit_of(REPO, rev)
        hf = AutoModelForCausalLM.from_pretrained(snapshot, attn_implementation="eager").eval()
        with torch.no_grad():
            assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4, rev
    # a commit hash is a revision too, and no revision means main (= step2 here)
    again = ModelPair.load(REPO, REPO, reference_revision=commit_of(REPO, "step1"), device="cpu")
    assert (again.reference_hash, again.intervened_hash) == (
        pair.reference_hash,
        pair.intervened_hash,
    )


def test_identical_revisions_raise_naming_both(hub):
    with pytest.raises(IdenticalModelsError) as info:
        ModelPair.load(
            REPO, REPO, reference_revision="step1", intervened_revision="step3", device="cpu"
        )
    msg = str(info.value)
    for needle in (
        f"'{REPO}@step1' (commit {commit_of(REPO, 'step1')})",
        f"'{REPO}@step3' (commit {commit_of(REPO, 'step3')})",
        "hold identical weights",
        "allow_identical=True",
    ):
        assert needle in msg, (needle, msg)


def test_missing_revision_names_what_is_cached(hub, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    def boot(*args, **kwargs):
        raise AssertionError("nothing may be loaded before both revisions are checked")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(boot))
    start = time.perf_counter()
    with pytest.raises(MissingRevisionError) as info:
        ModelPair.load(REPO, REPO, reference_revision="step1", intervened_revision="step9")
    assert time.perf_counter() - start < 5  # no network retries
    msg = str(info.value)
    assert isinstance(info.value, ModelLoadError)
    for needle in (
        f"revision 'step9' of hub model '{REPO}' is not in the local Hugging Face cache",
        f"main -> {commit_of(REPO, 'step2')}",
        *(f"{rev} -> {commit_of(REPO, rev)}" for rev in REVISIONS),
        "snapshots " + ", ".join(sorted(commit_of(REPO, rev) for rev in REVISIONS)),
        "HF_HUB_OFFLINE=1 is set",
        f"`hf download {REPO} --revision step9`",
    ):
        assert needle in msg, (needle, msg)
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="revision must be a non-empty"):
        ModelPair.load(REPO, REPO, reference_revision=" step1")
    (Path("local-ckpt")).mkdir()
    with pytest.raises(ConfigError, match="applies to hub names, but './local-ckpt' is a local"):
        ModelPair.load("./local-ckpt", REPO, reference_revision="step1")


def test_from_revisions_finds_duplicates_across_the_series(hub):
    with pytest.raises(DuplicateCheckpointsError) as info:
        CheckpointSeries.from_revisions(REPO, ["step1", "step2", "step3"], device="cpu")
    assert isinstance(info.value, IdenticalModelsError)
    assert info.value.groups == (("step1", "step3"),)  # not neighbours: the whole series
    msg = str(info.value)
    assert "'step1' (label 'step1') = 'step3' (label 'step3')" in msg
    assert "allow_duplicates=True" in msg
    with pytest.warns(UserWarning, match="duplicate weights"):
        series = CheckpointSeries.from_revisions(
            REPO, ["step1", "step2", "step3"], labels=[1, 2, 3], device="cpu", allow_duplicates=True
        )
    assert series.labels == (1, 2, 3) and series.names[2] == f"{REPO}@step3"
    clean = CheckpointSeries.from_revisions(REPO, ["step1", "step2"], device="cpu")
    assert clean.labels == ("step1", "step2")
    (pair,) = clean.pairs()
    assert pair.names == (f"{REPO}@step1", f"{REPO}@step2")
    assert pair.reference_hash != pair.intervened_hash
    with pytest.raises(MissingRevisionError, match="'step7'"):
        CheckpointSeries.from_revisions(REPO, ["step1", "step7"])
    with pytest.raises(ConfigError, match="at least 2 revisions"):
        CheckpointSeries.from_revisions(REPO, "step1")
