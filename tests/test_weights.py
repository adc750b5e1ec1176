from __future__ import annotations

import pytest
import torch

from mechdelta import ModelPair, Site, WeightDiff
from tests import _builders


def _perturbed(perturb):
    ref, itv = _builders.native_pair(perturb)
    return ModelPair(ref, itv)


@pytest.mark.parametrize(
    "perturb, expected",
    [
        (lambda m: m.blocks[1].attn.o.weight[:, 32:48].add_(0.05), ("head_o", 1, 2)),
        (lambda m: m.blocks[2].attn.q.weight[0:16].add_(0.05), ("head_q", 2, 0)),
        (lambda m: m.blocks[0].attn.v.bias[48:64].add_(0.05), ("head_v", 0, 3)),
        (lambda m: m.blocks[0].attn.o.bias.add_(0.05), ("attn_o_bias", 0, None)),
        (lambda m: m.blocks[1].mlp.out.weight.add_(0.05), ("mlp", 1, None)),
        (lambda m: m.blocks[2].ln2.weight.add_(0.05), ("ln2", 2, None)),
        (lambda m: m.embed.weight.add_(0.05), ("embed", None, None)),
        (lambda m: m.unembed.weight.add_(0.05), ("unembed", None, None)),
    ],
)
def test_delta_is_exactly_zero_except_the_perturbed_component(perturb, expected):
    wd = _perturbed(perturb).weight_diff()
    changed = [(r.component, r.layer, r.head) for r in wd.changed()]
    assert changed == [expected]
    row = wd.changed()[0]
    assert row.relative > 0
    df = wd.to_dataframe()
    assert len(df) == len(wd.rows) and (df["delta_norm"] > 0).sum() == 1
    # every unperturbed row is exactly zero
    others = [r for r in wd.rows if (r.component, r.layer, r.head) != expected]
    assert all(r.delta_norm == 0.0 for r in others)


def test_relative_change_value():
    wd = _perturbed(lambda m: m.blocks[1].attn.o.weight[:, 16:32].mul_(1.5)).weight_diff()
    (row,) = wd.changed()
    assert row.relative == pytest.approx(0.5, rel=1e-6)
    assert wd.sites() == {Site.parse("L1H1")}


def test_gqa_kv_rows_are_per_kv_head(tokenizer):
    ref = _builders.hf_model("llama", len(tokenizer), seed=0)
    itv = _builders.hf_model("llama", len(tokenizer), seed=0)
    with torch.no_grad():
        # kv head 1 owns rows 16:32 of k_proj (2 kv heads x d_head 16)
        itv.model.layers[1].self_attn.k_proj.weight[16:32].add_(0.1)
    pair = ModelPair.from_hf(ref, itv, tokenizer=tokenizer)
    wd = pair.weight_diff()
    assert [(r.component, r.layer, r.head) for r in wd.changed()] == [("head_k", 1, 1)]
    assert sum(1 for r in wd.rows if r.component == "head_k" and r.layer == 0) == 2
    assert sum(1 for r in wd.rows if r.component == "head_q" and r.layer == 0) == 4


def test_every_parameter_is_counted():
    pair = _perturbed(lambda m: m.blocks[0].attn.q.weight.add_(0.01))
    wd = pair.weight_diff()
    total_ref = sum(float((t.double() ** 2).sum()) for t in pair.reference.state_dict().values())
    assert sum(r.reference_norm**2 for r in wd.rows) == pytest.approx(total_ref, rel=1e-9)


def test_save_load_round_trip(tmp_path):
    wd = _perturbed(lambda m: m.blocks[1].mlp.out.weight.add_(0.05)).weight_diff()
    wd.save(tmp_path / "wd")
    back = WeightDiff.load(tmp_path / "wd")
    assert back.rows == wd.rows
    assert back.reference_hash == wd.reference_hash
    assert back.provenance["models"]["reference"]["weights_hash"] == wd.reference_hash
    assert not list(tmp_path.glob("wd/*.pkl"))


@pytest.mark.parametrize("proj", ["q", "o"])
def test_gpt2_head_slices_follow_the_conv1d_layout(tokenizer, proj):
    # GPT-2 keeps Conv1D weights ([in, out]): c_proj's rows are the heads' z dimensions, and
    # c_attn's q columns the heads' query dimensions. The tiny model is square (d_model 64 = 4
    # heads x 16), as GPT-2 itself is, so the shapes cannot tell rows from columns.
    ref = _builders.hf_model("gpt2", len(tokenizer), seed=0)
    itv = _builders.hf_model("gpt2", len(tokenizer), seed=0)
    with torch.no_grad():
        attn = itv.transformer.h[1].attn
        if proj == "o":
            attn.c_proj.weight[16:32].add_(0.1)  # head 1's rows of W_O
        else:
            attn.c_attn.weight[:, 16:32].add_(0.1)  # head 1's query columns
    pair = ModelPair.from_hf(ref, itv, tokenizer=tokenizer)
    changed = [(r.component, r.layer, r.head) for r in pair.weight_diff().changed()]
    assert changed == [(f"head_{proj}", 1, 1)]
