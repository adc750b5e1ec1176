"""PEFT adapters: ``ModelPair.from_adapter`` merges a LoRA written by the test onto a tiny GPT-2
(issue 15). Reference = the base, intervened = base + merged adapter."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from mechdelta.core.pair import ModelPair
from mechdelta.core.task import Task
from mechdelta.errors import (
    ConfigError,
    IdenticalModelsError,
    MissingDependencyError,
    ModelLoadError,
)
from mechdelta.patching.patch import patch
from mechdelta.patching.results import PatchResult
from tests import _builders

peft = pytest.importorskip("peft")

LAYER = 1  # the adapter adapts this layer's MLP only
ADAPTED = (f"transformer.h.{LAYER}.mlp.c_fc.weight", f"transformer.h.{LAYER}.mlp.c_proj.weight")


def write_lora(base: Path, out: Path, *, zero: bool) -> Path:
    """A LoRA on layer LAYER's MLP (c_fc and c_proj) of the base; ``zero``: PEFT's default
    initialisation (lora_B = 0, so merging changes nothing); else B ~ N(0, 0.5²), seeded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["mlp.c_fc", "mlp.c_proj"],
        layers_to_transform=[LAYER],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights transposed
    )
    with warnings.catch_warnings():  # PEFT reads a name transformers 5 deprecates
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        wrapped = peft.get_peft_model(model, cfg)
    if not zero:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    wrapped.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    tok = _builders.train_tokenizer()
    return _builders.save_checkpoint(tmp_path_factory.mktemp("base"), "gpt2", tok)


@pytest.fixture(scope="module")
def lora_pair(base_dir, tmp_path_factory) -> ModelPair:
    adapter = write_lora(base_dir, tmp_path_factory.mktemp("lora") / "adapter", zero=False)
    return ModelPair.from_adapter(base_dir, adapter, device="cpu")


def test_merged_lora_changes_only_the_adapted_modules(lora_pair, base_dir):
    from transformers import AutoModelForCausalLM

    info = lora_pair.adapter
    assert info is not None and info.peft_type == "LORA"
    assert set(info.target_modules) == {"mlp.c_fc", "mlp.c_proj"}
    assert info.changed == ADAPTED
    assert lora_pair.names[1].endswith("/adapter") and lora_pair.names[1].startswith(
        f"{base_dir} + "
    )
    assert lora_pair.provenance_models()["adapter"]["changed"] == list(ADAPTED)
    changed = lora_pair.weight_diff().changed()
    assert {(r.component, r.layer) for r in changed} == {("mlp", LAYER)}
    assert all(r.relative > 0.01 for r in changed)
    # the merged weights are exactly what PEFT's own (unmerged) adapter computes
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokens = torch.randint(0, 300, (3, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (lora_pair.reference(tokens) - base(tokens).logits).abs().max() < 1e-5
        shifted = (lora_pair.intervened(tokens) - lora_pair.reference(tokens)).abs().max()
    assert shifted > 1e-2


def test_restoring_the_adapted_mlp_explains_the_shift(lora_pair):
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, 300, (8, 6), generator=gen)
    with torch.no_grad():  # answers the adapter promotes most, wrong ones it demotes most
        moved = (lora_pair.intervened(tokens) - lora_pair.reference(tokens))[:, -1]
    task = Task(tokens, answers=moved.argmax(-1), wrong=moved.argmin(-1))
    for direction in ("reference->intervened", "intervened->reference"):
        adapted = patch(lora_pair, task, f"L{LAYER}.mlp_out", direction, n_boot=200)
        assert isinstance(adapted, PatchResult) and abs(adapted.shift.shift) > 1e-3
        assert adapted.score == pytest.approx(1.0, abs=1e-4), direction
        upstream = patch(lora_pair, task, "L0.mlp_out", direction, n_boot=200)
        assert isinstance(upstream, PatchResult)
        assert abs(upstream.score) < 1e-4, direction  # layer 0 is the base's in both models


def test_all_zero_lora_is_identical_to_its_base(base_dir, tmp_path):
    adapter = write_lora(base_dir, tmp_path / "zero-lora", zero=True)
    with pytest.raises(IdenticalModelsError) as info:
        ModelPair.from_adapter(base_dir, adapter, device="cpu")
    msg = str(info.value)
    for needle in (repr(str(adapter)), "LORA", "lora_B = 0", "allow_identical=True"):
        assert needle in msg, (needle, msg)
    with pytest.warns(UserWarning, match="identical weights"):
        pair = ModelPair.from_adapter(base_dir, adapter, device="cpu", allow_identical=True)
    assert pair.adapter is not None and pair.adapter.changed == ()


def test_adapter_errors(base_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="merge=False"):
        ModelPair.from_adapter(base_dir, tmp_path, merge=False)
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        ModelPair.from_adapter(base_dir, tmp_path, device="cpu")
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"mechdelta\[peft\]"):
        ModelPair.from_adapter(base_dir, tmp_path, device="cpu")
