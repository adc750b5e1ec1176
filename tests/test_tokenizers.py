"""Tokenizer differences between checkpoints and the shared-vocabulary mapping (issue 15)."""

from __future__ import annotations

import pytest
import torch

from mechdelta.core._compat import apply_shared_vocabulary, check_compatible, check_tokenizers
from mechdelta.core._loading import Processing, bridge_from_hf
from mechdelta.core._tokenizers import SharedVocabulary, diagnose_tokenizers, restrict_vocabulary
from mechdelta.core.task import Task
from mechdelta.errors import TaskError, TokenizerMismatchError
from tests import _builders

CHAT = ["<|im_start|>", "<|im_end|>"]


def _copy(tokenizer, tmp_path, name):
    from transformers import AutoTokenizer

    out = tmp_path / name
    tokenizer.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture
def chat_tokenizer(tokenizer, tmp_path):
    chat = _copy(tokenizer, tmp_path, "chat")
    assert chat.add_special_tokens({"additional_special_tokens": CHAT}) == 2
    return _copy(chat, tmp_path, "chat-saved")  # as saved with a checkpoint (TL re-loads by path)


def test_appended_chat_tokens_are_diagnosed_and_listed(tokenizer, chat_tokenizer):
    n = len(tokenizer)
    diff = diagnose_tokenizers(tokenizer, chat_tokenizer)
    assert diff.kind == "appended" and diff.runnable
    assert diff.extended == "intervened" and diff.n_shared == n
    assert diff.appended == ((n, "<|im_start|>"), (n + 1, "<|im_end|>"))
    assert diff.special_changes == () and diff.n_differing == 0
    text = diff.explain()
    assert f"'<|im_end|>' (id {n + 1})" in text and 'vocab="shared"' in text
    # Either side may hold the appended tokens.
    back = diagnose_tokenizers(chat_tokenizer, tokenizer)
    assert back.kind == "appended" and back.extended == "reference"
    assert diagnose_tokenizers(tokenizer, tokenizer).kind == "identical"


def test_exact_mode_refuses_appended_tokens_and_explains(tokenizer, chat_tokenizer):
    with pytest.raises(TokenizerMismatchError, match=r"appends 2 token.*vocab=\"shared\""):
        check_tokenizers(tokenizer, chat_tokenizer)
    check_tokenizers(tokenizer, chat_tokenizer, vocab="shared")
    check_tokenizers(tokenizer, tokenizer)
    with pytest.raises(TokenizerMismatchError, match="identical"):
        SharedVocabulary.from_tokenizers(tokenizer, tokenizer)


def test_changed_special_tokens_are_an_explained_error(tokenizer, tmp_path):
    chat = _copy(tokenizer, tmp_path, "eos")
    chat.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    chat.eos_token = "<|im_end|>"
    diff = diagnose_tokenizers(tokenizer, chat)
    assert diff.kind == "special_tokens" and not diff.runnable
    assert ("eos_token", "<|endoftext|>", "<|im_end|>") in diff.special_changes
    for vocab in ("exact", "shared"):
        with pytest.raises(
            TokenizerMismatchError, match=r"special tokens changed \(eos_token: '<\|endoftext"
        ):
            check_tokenizers(tokenizer, chat, vocab=vocab)
    # A shared token that stops being special is a change too.
    plain = _copy(tokenizer, tmp_path, "plain")
    plain.add_special_tokens({"additional_special_tokens": ["<|x|>"]})
    demoted = _copy(tokenizer, tmp_path, "demoted")
    demoted.add_tokens(["<|x|>"])  # same id, not special
    diff = diagnose_tokenizers(plain, demoted)
    assert diff.kind == "special_tokens"
    assert diff.special_changes == ((f"special id {len(tokenizer)}", "<|x|>", None),)


def test_truly_different_tokenizer_is_refused_with_the_reason():
    tokenizer = _builders.train_tokenizer(270)
    other = _builders.train_tokenizer(
        270, corpus=["zebra quartz jukebox " * 30, "vexing fjord nymph"]
    )
    assert len(other) == len(tokenizer)
    diff = diagnose_tokenizers(tokenizer, other)
    assert diff.kind == "different" and diff.n_differing > 0 and len(diff.examples) == 5
    i, r, v = diff.examples[0]
    assert tokenizer.convert_ids_to_tokens(i) == r != v == other.convert_ids_to_tokens(i)
    for vocab in ("exact", "shared"):
        with pytest.raises(
            TokenizerMismatchError, match=rf"{diff.n_differing} of the \d+ shared ids name"
        ):
            check_tokenizers(tokenizer, other, vocab=vocab)


def _chat_pair(tokenizer, chat_tokenizer):
    """Reference: a tiny GPT-2; intervened: the same weights plus two trained chat-token rows."""
    ref_hf = _builders.hf_model("gpt2", len(tokenizer), seed=0)
    itv_hf = _builders.hf_model("gpt2", len(tokenizer), seed=0)
    itv_hf.resize_token_embeddings(len(chat_tokenizer))
    with torch.no_grad():
        itv_hf.get_input_embeddings().weight[len(tokenizer) :] = 0.5  # trained chat rows
    ref = bridge_from_hf(ref_hf, tokenizer=tokenizer, processing=Processing.RAW)
    itv = bridge_from_hf(itv_hf, tokenizer=chat_tokenizer, processing=Processing.RAW)
    return ref, itv


def test_shared_vocabulary_runs_an_appended_pair_end_to_end(tokenizer, chat_tokenizer):
    n = len(tokenizer)
    ref, itv = _chat_pair(tokenizer, chat_tokenizer)
    tokens = torch.tensor([tokenizer.encode("the cat sat on the mat")])
    with torch.no_grad():
        full_ref, full_itv = ref(tokens), itv(tokens)
    assert full_itv.shape[-1] == n + 2 and torch.equal(full_ref, full_itv[..., :n])
    with pytest.raises(TokenizerMismatchError, match="appends 2 token"):
        check_compatible(ref, itv)

    mapping = apply_shared_vocabulary(ref, itv)
    assert mapping.n_shared == n and mapping.extended == "intervened"
    assert ref.cfg.d_vocab == itv.cfg.d_vocab == n
    check_compatible(ref, itv, vocab="shared")  # every contract check passes on the cut models
    with torch.no_grad():
        cut_ref, cut_itv = ref(tokens), itv(tokens)
    # Logits of the shared ids are exactly what each model computed before the cut ...
    assert cut_itv.shape[-1] == n
    torch.testing.assert_close(cut_itv, full_itv[..., :n], rtol=0, atol=1e-6)
    torch.testing.assert_close(cut_ref, full_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(mapping.restrict_logits(full_itv), cut_itv, rtol=0, atol=1e-6)
    # ... and softmax metrics renormalise over the shared vocabulary: log p_shared(t) =
    # log p_full(t) - log(1 - mass of the appended tokens), and equals the reference's exactly
    # (same weights on the shared part).
    mass = full_itv.softmax(-1)[..., n:].sum(-1, keepdim=True)
    assert mass.min() > 1e-3
    torch.testing.assert_close(
        cut_itv.log_softmax(-1),
        full_itv.log_softmax(-1)[..., :n] - torch.log1p(-mass),
        rtol=0,
        atol=1e-5,
    )
    torch.testing.assert_close(cut_itv.log_softmax(-1), cut_ref.log_softmax(-1), rtol=0, atol=1e-5)


def test_a_task_with_an_appended_token_names_it(tokenizer, chat_tokenizer):
    n = len(tokenizer)
    mapping = SharedVocabulary.from_tokenizers(tokenizer, chat_tokenizer)
    assert mapping.to_dict()["appended"] == [[n, "<|im_start|>"], [n + 1, "<|im_end|>"]]
    mapping.check_task(
        Task(["the cat sat", "the dog sat"], answers=[" on", " on"], metric="logprob")
    )
    with pytest.raises(TaskError, match=rf"prompts\[1\] .*'<\|im_end\|>' \(id {n + 1}\)"):
        mapping.check_task(Task(["the cat sat", "hello<|im_end|>"], metric="loss"))
    with pytest.raises(TaskError, match=rf"prompts uses .*'<\|im_start\|>' \(id {n}\)"):
        mapping.check_task(Task(torch.tensor([[1, 2], [3, n]]), metric="loss"))
    with pytest.raises(TaskError, match=rf"answers\[0\] .*id {n + 1}"):
        mapping.check_task(Task(torch.tensor([[1, 2]]), answers=[n + 1], metric="logprob"))


def test_a_model_pair_with_vocab_shared_runs_the_patching_engine(tokenizer, chat_tokenizer):
    import mechdelta as md

    ref, itv = _chat_pair(tokenizer, chat_tokenizer)
    with torch.no_grad():  # a shift: the intervened model's first MLP differs
        next(p for n, p in itv.named_parameters() if "mlp" in n and p.ndim == 2).mul_(1.5)
    with pytest.raises(TokenizerMismatchError, match="vocab='shared'|vocab=\"shared\""):
        md.ModelPair(ref, itv)
    pair = md.ModelPair(ref, itv, vocab="shared")
    assert pair.vocabulary is not None and len(pair.tokenizer) == len(chat_tokenizer)
    assert pair.provenance_models()["vocab"]["n_shared"] == len(tokenizer)
    task = md.Task(["the cat sat on the", "the dog sat on the"], metric="loss")
    shift = md.measure_shift(pair, task, n_boot=200, warn=False)
    assert shift.shift != 0
    with pytest.raises(TaskError, match="im_end"):
        md.measure_shift(pair, md.Task(["the cat<|im_end|>", "the dog sat"], metric="loss"))


@pytest.mark.parametrize("kind", ["native", "neox-compat", "llama"])
def test_restricting_the_vocabulary_keeps_the_shared_logits_exactly(kind, tokenizer):
    """Separate (untied) embedding and unembedding, processed weights, GQA: same contract."""
    if kind == "native":
        model = _builders.native_bridge(0)
        n = 40
    else:
        family, _, proc = kind.partition("-")
        hf = _builders.hf_model(family, len(tokenizer) + 7, seed=0)
        processing = Processing.COMPAT if proc else Processing.RAW
        model = bridge_from_hf(hf, tokenizer=tokenizer, processing=processing)
        n = len(tokenizer)
    tokens = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        full = model(tokens)
        restrict_vocabulary(model, n)
        cut = model(tokens)
    assert model.cfg.d_vocab == n and cut.shape[-1] == n
    torch.testing.assert_close(cut, full[..., :n], rtol=0, atol=1e-6)
