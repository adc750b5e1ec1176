from __future__ import annotations

import shutil

import pytest
import torch

import mechdelta as md
from mechdelta import (
    ArchitectureMismatchError,
    DtypeMismatchError,
    HookMismatchError,
    IdenticalModelsError,
    MissingTokenizerError,
    ModelLoadError,
    ModelPair,
    ProcessingMismatchError,
    TokenizerMismatchError,
)
from tests import _builders
from tests._builders import FAMILIES


@pytest.fixture(scope="module")
def seeded_checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("pairs")
    return {
        f: (
            _builders.save_checkpoint(root, f, tokenizer, seed=0),
            _builders.save_checkpoint(root, f, tokenizer, seed=1),
        )
        for f in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_load_local_pair_matches_hf_logits(family, seeded_checkpoints):
    from transformers import AutoModelForCausalLM

    ref_dir, itv_dir = seeded_checkpoints[family]
    pair = ModelPair.load(ref_dir, itv_dir, device="cpu")
    tokens = pair.reference.to_tokens(["the cat sat on the mat", "hello world"])
    for model, path in ((pair.reference, ref_dir), (pair.intervened, itv_dir)):
        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        with torch.no_grad():
            diff = (model(tokens) - hf(tokens).logits).abs().max().item()
        assert diff < 1e-4, diff
    assert pair.reference_hash != pair.intervened_hash
    assert pair.processing is md.Processing.RAW
    assert pair.names == (str(ref_dir), str(itv_dir))
    text = pair.summary()
    wd = pair.weight_diff()
    assert str(pair.cfg.architecture) in text
    assert pair.reference_hash in text and pair.intervened_hash in text
    assert f"{len(wd.changed())} of {len(wd.rows)} weight components" in text
    assert 0 < len(wd.changed()) < len(wd.rows)  # norms start at ones/zeros for every seed
    assert "<table>" in pair._repr_html_()


def test_compat_processing_applies_to_both(seeded_checkpoints):
    ref_dir, itv_dir = seeded_checkpoints["gpt2"]
    raw = ModelPair.load(ref_dir, itv_dir, device="cpu")
    compat = ModelPair.load(ref_dir, itv_dir, device="cpu", processing="compat")
    assert compat.processing is md.Processing.COMPAT
    tokens = raw.reference.to_tokens("the cat sat")
    with torch.no_grad():
        a = raw.reference(tokens)
        b = compat.reference(tokens)
    # HookedTransformer-style processing centres the unembedding: logits agree after centring
    centred = (a - a.mean(-1, keepdim=True)) - (b - b.mean(-1, keepdim=True))
    assert centred.abs().max().item() < 1e-4
    with pytest.raises(ProcessingMismatchError, match="reference='raw', intervened='compat'"):
        ModelPair(raw.reference, compat.intervened)


def test_from_hf_in_memory(tokenizer):
    ref = _builders.hf_model("llama", len(tokenizer), seed=0)
    itv = _builders.hf_model("llama", len(tokenizer), seed=1)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = itv(tokens).logits
    pair = ModelPair.from_hf(ref, itv, tokenizer=tokenizer)
    with torch.no_grad():
        assert (pair.intervened(tokens) - expected).abs().max().item() < 1e-4
    assert pair.shape.n_kv_heads == 2


def test_from_hf_without_tokenizer_raises(tokenizer):
    ref = _builders.hf_model("gpt2", len(tokenizer))
    with pytest.raises(MissingTokenizerError, match="needs tokenizer"):
        ModelPair.from_hf(ref, ref, tokenizer=None)


def test_checkpoint_without_tokenizer_files_raises(tmp_path, seeded_checkpoints):
    ref_dir, _ = seeded_checkpoints["gpt2"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(ref_dir / f, bare / f)
    with pytest.raises(MissingTokenizerError, match="no tokenizer files"):
        ModelPair.load(bare, ref_dir)


def test_empty_tokenizer_is_caught():
    from mechdelta.core._loading import check_tokenizer

    class Empty:
        def __len__(self) -> int:
            return 0

    with pytest.raises(MissingTokenizerError, match="empty tokenizer"):
        check_tokenizer(Empty(), "x")


def test_bad_paths_and_offline_hub_names(tmp_path):
    with pytest.raises(ModelLoadError, match="local checkpoint directory .* does not exist"):
        ModelPair.load(tmp_path / "missing", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        ModelPair.load(tmp_path / "empty", tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        ModelPair.load("mechdelta-no-such-model", "mechdelta-no-such-model")


def test_peft_needs_optional_dependency(tmp_path, seeded_checkpoints):
    pytest.importorskip("transformers")
    try:
        import peft  # noqa: F401
    except ImportError:
        with pytest.raises(md.MissingDependencyError, match="mechdelta\\[peft\\]"):
            ModelPair.from_peft(seeded_checkpoints["gpt2"][0], tmp_path)
    else:
        with pytest.raises(ModelLoadError, match="adapter_config.json"):
            ModelPair.from_peft(seeded_checkpoints["gpt2"][0], tmp_path)


# --- the compatibility contract -----------------------------------------------------------------


def test_architecture_mismatch_names_both_values():
    a = _builders.native_bridge(0)
    b = _builders.native_bridge(0, n_layers=2)
    with pytest.raises(
        ArchitectureMismatchError, match="'n_layers' differs: reference=3, intervened=2"
    ):
        ModelPair(a, b)
    c = _builders.native_bridge(0, d_vocab=51)
    with pytest.raises(ArchitectureMismatchError, match="d_vocab"):
        ModelPair(a, c)


def test_tokenizer_mismatch():
    tokenizer = _builders.train_tokenizer(vocab_size=270)
    other = _builders.train_tokenizer(
        270, corpus=["zebra quartz jukebox " * 30, "vexing fjord nymph"]
    )
    assert len(other) == len(tokenizer)
    a = _builders.native_bridge(0, d_vocab=len(tokenizer))
    b = _builders.native_bridge(1, d_vocab=len(tokenizer))
    a.tokenizer = tokenizer
    with pytest.raises(TokenizerMismatchError, match="vocabulary hash"):
        ModelPair(a, b)
    b.tokenizer = other
    with pytest.raises(TokenizerMismatchError):
        ModelPair(a, b)
    b.tokenizer = _builders.train_tokenizer(vocab_size=270)
    ModelPair(a, b)  # same vocabulary, separately trained: same hash


def test_dtype_mismatch():
    a = _builders.native_bridge(0)
    b = _builders.native_bridge(1).to(torch.float64)
    with pytest.raises(
        DtypeMismatchError, match="reference=torch.float32, intervened=torch.float64"
    ):
        ModelPair(a, b)


def test_device_mismatch_error_message():
    from mechdelta.core._compat import check_compatible

    a = _builders.native_bridge(0)
    b = _builders.native_bridge(1)
    meta = torch.nn.Parameter(torch.empty(1, device="meta"))
    b.parameters = lambda: iter([meta])  # type: ignore[method-assign]
    with pytest.raises(md.DeviceMismatchError, match="reference on cpu, intervened on meta"):
        check_compatible(a, b)


def test_hook_mismatch():
    a = _builders.native_bridge(0)
    b = _builders.native_bridge(1)
    from transformer_lens.hook_points import HookPoint

    b._hook_registry["blocks.0.hook_extra"] = HookPoint()
    with pytest.raises(HookMismatchError, match="only in intervened \\['blocks.0.hook_extra'\\]"):
        ModelPair(a, b)


def test_identical_weights():
    a = _builders.native_bridge(0)
    b = _builders.native_bridge(0)
    with pytest.raises(IdenticalModelsError, match="allow_identical=True"):
        ModelPair(a, b)
    with pytest.warns(UserWarning, match="identical weights"):
        pair = ModelPair(a, b, allow_identical=True)
    assert pair.weight_diff().identical
