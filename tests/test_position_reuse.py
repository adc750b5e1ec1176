"""Position reuse on TL-native models: a by-position patched pass covers positions p0.. only and
attends to the clean run's keys/values for positions < p0, recorded inside ``NativeAttention``
(learned positional embeddings, grouped-query attention, rotary). Every number must equal the
plain full-sequence path, and a failed check must fall back to it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mechdelta as md
from mechdelta.patching._runner import (
    CacheHooks,
    ModelRunner,
    NativeKeyValues,
    NativePast,
    prefix_cache,
)
from tests import _builders
from tests._reference import N_BOOT, contrast_task, perturb_matching, random_tokens

TOL = 1e-5
BOTH_USED = {"reference": True, "intervened": True}

CONFIGS: dict[str, dict[str, Any]] = {
    "standard": {},
    "gqa": {"n_key_value_heads": 2},
    "rotary-gqa": {
        "positional_embedding_type": "rotary",
        "n_key_value_heads": 1,
        "normalization_type": "RMS",
        "gated_mlp": True,
        "act_fn": "silu",
    },
}


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[md.ModelPair, md.Task]]:
    out = {}
    for name, overrides in CONFIGS.items():
        ref, itv = _builders.native_pair(
            lambda m: perturb_matching(m, lambda k: True, scale=0.3), **overrides
        )
        pair = md.ModelPair(ref, itv, names=(f"{name}-ref", f"{name}-itv"))
        tokens = random_tokens(4, 7, int(pair.cfg.d_vocab), seed=5)
        out[name] = (pair, contrast_task(pair, tokens))
    return out


@pytest.fixture
def past_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The p0 of every patched pass that ran on a recorded native KV prefix."""
    seen: list[int] = []
    original = ModelRunner.logits_at

    def spy(self: ModelRunner, positions: Any, **kwargs: Any) -> Any:
        past = kwargs.get("past_key_values")
        if isinstance(past, NativePast):
            seen.append(past.p0)
        return original(self, positions, **kwargs)

    monkeypatch.setattr(ModelRunner, "logits_at", spy)
    return seen


def _sweep(pair: md.ModelPair, task: md.Task, component: str, **kwargs: Any) -> Any:
    return md.sweep(
        pair, task, component, per_position=True, n_boot=N_BOOT, progress=False, **kwargs
    )


@pytest.mark.parametrize("config", list(CONFIGS))
def test_runner_from_a_kv_prefix_reproduces_the_clean_logits(pairs, config):
    """From any layer and any p0, a run over positions p0.. with the recorded keys/values of the
    positions before gives the full forward's logits at p0.. (for both models)."""
    pair, _ = pairs[config]
    tokens = random_tokens(3, 9, int(pair.cfg.d_vocab), seed=2)
    n_layers = int(pair.cfg.n_layers)
    for model in (pair.reference, pair.intervened):
        runner = ModelRunner(model)
        runner.record_block_convention(tokens)
        cacher = CacheHooks([f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)])
        positions = torch.arange(9).repeat(3, 1)
        clean = runner.logits_at(positions, tokens=tokens, hooks=cacher.hooks())
        torch.testing.assert_close(clean, runner.full_logits(tokens), rtol=0, atol=TOL)
        kv = runner.key_values(tokens)
        assert isinstance(kv, NativeKeyValues) and len(kv) == n_layers
        n_kv = CONFIGS[config].get("n_key_value_heads", int(pair.cfg.n_heads))
        assert kv[0][0].shape == (3, n_kv, 9, int(pair.cfg.d_head))
        for layer in range(n_layers):
            resid = cacher.store[f"blocks.{layer}.hook_resid_pre"]
            for p0 in (2, 8):
                got = runner.logits_at(
                    positions[:, p0:] - p0,
                    resid=resid[:, p0:],
                    start_layer=layer,
                    past_key_values=prefix_cache(kv, slice(0, 3), p0, 1),
                )
                diff = (got - clean[:, p0:]).abs().max().item()
                assert diff < TOL, (config, layer, p0, diff)
        # the attention modules are left as they were
        assert all("forward" not in b.attn.original_component.__dict__ for b in model.blocks)


R2I, I2R = "reference->intervened", "intervened->reference"
# per config: (component, direction) of each by-position sweep (per-head ones on head 3; head_out
# also on head 0)
SWEEPS: dict[str, list[tuple[str, str]]] = {
    "standard": [
        ("head_out", "both"),
        ("resid_pre", I2R),
        ("head_q", R2I),
        ("head_k", I2R),
        ("head_v", R2I),
        ("head_pattern", I2R),
        ("mlp_out", R2I),
    ],
    "gqa": [("head_out", "both"), ("head_q", I2R), ("head_k", R2I), ("head_v", I2R)],
    "rotary-gqa": [
        ("head_out", "both"),
        ("resid_pre", R2I),
        ("head_q", R2I),
        ("head_k", I2R),
        ("head_v", R2I),
        ("mlp_out", I2R),
    ],
}


def _singles(result: Any) -> list[Any]:
    return [result] if isinstance(result, md.SweepResult) else list(result)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_by_position_sweeps_equal_full_forwards(pairs, config, past_runs):
    """By-position sweeps of every component kind: position reuse changes no number, and
    provenance records it as used for the target model (for both models in a "both" sweep)."""
    pair, task = pairs[config]
    for component, direction in SWEEPS[config]:
        kwargs: dict[str, Any] = {"direction": direction, "batch_budget": 12}
        if md.Component(component).per_head:
            kwargs["heads"] = [0, 3] if component == "head_out" else [3]
        past_runs.clear()
        fast = _sweep(pair, task, component, **kwargs)
        assert past_runs and max(past_runs) > 0, component  # the shortened passes really ran
        past_runs.clear()
        plain = _sweep(pair, task, component, prefix_reuse=False, **kwargs)
        assert not past_runs
        for a, b in zip(_singles(fast), _singles(plain), strict=True):
            assert a.provenance["engine"]["position_reuse"][a.direction.target] is True
            diff = (a.per_prompt - b.per_prompt).abs().max().item()
            assert diff < TOL, (component, a.direction, diff)
            # patches at later positions carry real effects (the comparison is not vacuous)
            moved = (a.per_prompt[:, 1:] - a.per_prompt[:, :1]).abs().max().item()
            assert moved > 1e-4, (component, a.direction)
        if direction == "both":  # one engine: by the second direction both models were checked
            assert _singles(fast)[-1].provenance["engine"]["position_reuse"] == BOTH_USED


def test_a_failed_check_falls_back_to_full_sequences(pairs, monkeypatch, past_runs):
    """Keys/values that do not reproduce the clean run (here: perturbed) are refused by the
    engine's once-per-model check: provenance says so and the numbers are the plain path's."""
    pair, task = pairs["standard"]
    original = ModelRunner.key_values

    def wrong(self: ModelRunner, tokens: torch.Tensor) -> Any:
        kv = original(self, tokens)
        assert isinstance(kv, NativeKeyValues)
        return NativeKeyValues((k + 0.5, v) for k, v in kv)

    monkeypatch.setattr(ModelRunner, "key_values", wrong)
    kwargs: dict[str, Any] = {"direction": "both", "batch_budget": 12, "heads": [1]}
    fast = _sweep(pair, task, "head_out", **kwargs)
    plain = _sweep(pair, task, "head_out", prefix_reuse=False, **kwargs)
    # the check ran once per model (p0 > 0), then no patched pass used a prefix
    assert sorted(past_runs) == [6, 6]
    assert _singles(fast)[-1].provenance["engine"]["position_reuse"] == {
        "reference": False,
        "intervened": False,
    }
    for a, b in zip(fast, plain, strict=True):
        assert a.provenance["engine"]["position_reuse"][a.direction.target] is False
        assert (a.per_prompt - b.per_prompt).abs().max().item() < TOL


def test_a_kv_prefix_is_validated():
    with pytest.raises(md.PatchingError, match="negative"):
        NativePast(-1, None)
    with pytest.raises(md.PatchingError, match="every layer"):
        NativePast(2, None)


def test_hf_models_keep_their_own_cache(hf_pairs):
    """An HF-backed bridge is not routed through the native mechanism."""
    pair = hf_pairs["gpt2"]
    runner = ModelRunner(pair.intervened)
    kv = runner.key_values(random_tokens(2, 5, int(pair.cfg.d_vocab), seed=1))
    assert kv is not None and not isinstance(kv, NativeKeyValues)
    assert not isinstance(prefix_cache(kv, slice(0, 2), 3, 2), NativePast)
