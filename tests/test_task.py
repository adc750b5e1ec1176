"""Task: validation, tokenization into a right-padded batch, the metric's read plan."""

from __future__ import annotations

import pytest
import torch

import mechdelta as md
from mechdelta import MetricError, Task, TaskError
from tests import _builders
from tests._reference import N_BOOT, contrast_answers, perturb_matching

N_CTX, VOCAB = 16, 50


def prepare(task: Task, tokenizer=None):
    return task.prepare(tokenizer, n_ctx=N_CTX, d_vocab=VOCAB)


# --- construction ---------------------------------------------------------------------------------


def test_task_validates_its_fields():
    with pytest.raises(TaskError, match="at least one prompt"):
        Task([], answers=[], wrong=[])
    with pytest.raises(TaskError, match="not one string: wrap it"):
        Task("the cat", metric="loss")
    with pytest.raises(TaskError, match="scalar"):
        Task(torch.tensor(3), metric="loss")
    with pytest.raises(TaskError, match="answers has 1 entries for 2 prompts"):
        Task([[1, 2], [3, 4]], answers=[1], wrong=[2, 3])
    with pytest.raises(TaskError, match="wrong has 3 entries for 2 prompts"):
        Task([[1, 2], [3, 4]], answers=[1, 2], wrong=[2, 3, 4])
    with pytest.raises(TaskError, match="corrupted has 1 prompts for 2"):
        Task([[1, 2], [3, 4]], corrupted=[[1, 2]], metric="loss")
    with pytest.raises(TaskError, match="metric 'logit_diff' needs answers"):
        Task([[1, 2]])
    with pytest.raises(TaskError, match="metric 'logit_diff' needs wrong"):
        Task([[1, 2]], answers=[1])
    with pytest.raises(TaskError, match="metric 'logprob' needs answers"):
        Task([[1, 2]], metric="logprob")
    with pytest.raises(TaskError, match="loss_mask only applies to the 'loss' metric"):
        Task([[1, 2]], answers=[1], metric="prob", loss_mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(MetricError, match="unknown metric 'accuracy'"):
        Task([[1, 2]], metric="accuracy")
    task = Task([[1, 2], [3]], answers=[1, 2], metric="logprob", name="demo")
    assert len(task) == 2 and task.metric_spec.name == "logprob" and task.name == "demo"


# --- tokenization -----------------------------------------------------------------------------------


def test_ragged_token_prompts_are_right_padded_and_read_at_their_own_last_token():
    p = prepare(Task([[5, 6, 7], [8], [9, 10]], answers=[1, 2, 3], wrong=[4, 5, 6]))
    assert p.tokens.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert p.lengths.tolist() == [3, 1, 2]
    assert p.ragged and p.batch_size == 3 and p.seq_len == 3
    assert p.inputs.positions.tolist() == [[2], [0], [1]]
    assert p.inputs.valid.all()
    assert p.inputs.answers.tolist() == [1, 2, 3] and p.inputs.wrong.tolist() == [4, 5, 6]
    assert p.str_tokens(1) == ["8"]  # no tokenizer: ids as text
    with pytest.raises(TaskError, match=r"by-position sweep needs prompts of one token length"):
        p.require_aligned("a by-position sweep")


def test_tensor_prompts_and_answers():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    p = prepare(Task(tokens, answers=torch.tensor([7, 8]), wrong=torch.tensor([9, 10])))
    assert torch.equal(p.tokens, tokens) and not p.ragged
    p.require_aligned("anything")  # aligned: no error
    with pytest.raises(TaskError, match="integer token ids"):
        prepare(Task(tokens.float(), metric="loss"))
    with pytest.raises(TaskError, match="one integer token id per prompt"):
        prepare(Task(tokens, answers=tokens, wrong=torch.tensor([1, 2])))


def test_bad_token_input_raises():
    with pytest.raises(TaskError, match=f"17 tokens, more than the model's n_ctx={N_CTX}"):
        prepare(Task([list(range(1, 18))], metric="loss"))
    with pytest.raises(TaskError, match="empty prompt"):
        prepare(Task([[1, 2], []], metric="loss"))
    with pytest.raises(TaskError, match=r"prompts holds token ids outside \[0, d_vocab=50\)"):
        prepare(Task([[1, 50]], metric="loss"))
    with pytest.raises(TaskError, match=r"answers holds token ids outside"):
        prepare(Task([[1, 2]], answers=[-1], wrong=[3]))
    with pytest.raises(TaskError, match="string but the models have no tokenizer"):
        prepare(Task(["the cat"], metric="loss"))
    with pytest.raises(
        TaskError, match=r"answers\[0\] is a string but the models have no tokenizer"
    ):
        prepare(Task([[1, 2]], answers=["x"], wrong=[3]))
    with pytest.raises(
        TaskError,
        match="corrupted prompt 1 has 2 tokens, its prompt 3: corrupted inputs must align",
    ):
        prepare(Task([[1, 2], [3, 4, 5]], corrupted=[[6, 7], [8, 9]], metric="loss"))


def test_string_prompts_and_answers_with_a_real_tokenizer(tokenizer):
    bos = tokenizer.bos_token_id
    ids = tokenizer.encode("the cat sat", add_special_tokens=False)
    p = Task(["the cat sat"], answers=[" on"], wrong=[" the"]).prepare(
        tokenizer, n_ctx=32, d_vocab=len(tokenizer)
    )
    assert p.tokens.tolist() == [[bos, *ids]]  # BOS prepended by default (TL's convention)
    assert p.inputs.answers.tolist() == tokenizer.encode(" on", add_special_tokens=False)
    assert "".join(p.str_tokens(0)[1:]) == "the cat sat"
    bare = Task(["the cat sat"], answers=[" on"], wrong=[" the"], prepend_bos=False).prepare(
        tokenizer, n_ctx=32, d_vocab=len(tokenizer)
    )
    assert bare.tokens.tolist() == [ids]
    with pytest.raises(TaskError, match=r"answers\[1\]=' cat' is 2 tokens .* not a single token"):
        Task(["a", "b"], answers=[" on", " cat"], wrong=[" the", " the"]).prepare(
            tokenizer, n_ctx=32, d_vocab=len(tokenizer)
        )


def test_multi_token_answers_are_caught_on_a_real_pair(hf_pairs):
    pair = hf_pairs["gpt2"]
    task = Task(["the cat sat", "the dog"], answers=[" on", " mat"], wrong=[" the", " sat"])
    with pytest.raises(TaskError, match=r"answers\[1\]=' mat' is 2 tokens"):
        md.measure_shift(pair, task, n_boot=N_BOOT)


def test_prompt_hash_tracks_content():
    a = prepare(Task([[1, 2, 3]], answers=[4], wrong=[5]))
    assert a.prompt_hash() == prepare(Task([[1, 2, 3]], answers=[4], wrong=[5])).prompt_hash()
    assert a.prompt_hash() != prepare(Task([[1, 2, 3]], answers=[6], wrong=[5])).prompt_hash()
    assert a.prompt_hash() != prepare(Task([[1, 2, 4]], answers=[4], wrong=[5])).prompt_hash()


# --- the loss read plan ----------------------------------------------------------------------------


def test_loss_reads_every_real_token_after_the_first_by_default():
    p = prepare(Task([[5, 6, 7, 8], [9, 10]], metric="loss"))
    # the prediction of token t is read at position t - 1
    assert p.inputs.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert p.inputs.targets.tolist() == [[6, 7, 8], [10, 0, 0]]
    assert p.inputs.valid.tolist() == [[True, True, True], [True, False, False]]


def test_loss_mask_selects_targets_and_is_validated():
    mask = torch.tensor([[False, False, True, True], [False, True, False, False]])
    p = prepare(Task([[5, 6, 7, 8], [9, 10]], metric="loss", loss_mask=mask))
    assert p.inputs.positions.tolist() == [[1, 2], [0, 0]]
    assert p.inputs.targets.tolist() == [[7, 8], [10, 0]]
    assert p.inputs.valid.tolist() == [[True, True], [True, False]]
    rows = [[5, 6, 7], [9, 10]]
    bad = {
        "must be \\[batch=2, pos>=3\\]": torch.zeros(2, 2, dtype=torch.bool),
        "first token has no prediction": torch.tensor([[True, True, False], [False, True, False]]),
        "padding positions": torch.tensor([[False, True, False], [False, True, True]]),
        "prompt 1 has no scored token": torch.tensor([[False, True, True], [False, False, False]]),
    }
    for message, m in bad.items():
        with pytest.raises(TaskError, match=message):
            prepare(Task(rows, metric="loss", loss_mask=m))
    with pytest.raises(TaskError, match="prompt 0 has no scored token"):
        prepare(Task([[5]], metric="loss"))


# --- end to end: ragged tasks on a pair ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore::mechdelta.TooFewPromptsWarning")
def test_ragged_shift_equals_each_prompt_alone():
    ref, itv = _builders.native_pair(lambda m: perturb_matching(m, lambda k: True))
    pair = md.ModelPair(ref, itv)
    rows = [[3, 9, 4, 1, 7], [12, 30], [8, 8, 2, 40]]
    tokens = torch.zeros(3, 5, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    answers, wrong = contrast_answers(pair, tokens, torch.tensor([5, 2, 4]))
    whole = md.measure_shift(pair, Task(rows, answers=answers, wrong=wrong), n_boot=N_BOOT)
    for i, r in enumerate(rows):
        alone = md.measure_shift(
            pair, Task([r], answers=answers[i : i + 1], wrong=wrong[i : i + 1]), n_boot=N_BOOT
        )
        assert abs(whole.reference[i].item() - alone.reference[0].item()) < 1e-5
        assert abs(whole.intervened[i].item() - alone.intervened[0].item()) < 1e-5


# --- subsets (split halves) ------------------------------------------------------------------------


def test_subset_of_list_prompts_follows_answers_and_wrong_in_index_order():
    task = Task(
        [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]],
        answers=[1, 2, 3, 4],
        wrong=[21, 22, 23, 24],
        name="demo",
        prepend_bos=False,
        align="right",
    )
    sub = task.subset([3, 0])
    assert [list(p) for p in sub.prompts] == [[11, 12, 13, 14], [5, 6, 7]]
    assert list(sub.answers) == [4, 1] and list(sub.wrong) == [24, 21]
    assert sub.corrupted is None and sub.loss_mask is None
    assert len(sub) == 2 and sub.name == "demo"
    assert (sub.metric_spec.name, sub.prepend_bos, sub.align) == ("logit_diff", False, "right")
    assert task.subset(range(1, 3), name="half").name == "half"
    assert len(task) == 4 and list(task.answers) == [1, 2, 3, 4]  # the original is untouched
    p = prepare(sub)
    assert p.tokens.tolist() == [[11, 12, 13, 14], [5, 6, 7, 0]]
    assert p.inputs.answers.tolist() == [4, 1] and p.inputs.wrong.tolist() == [24, 21]


def test_subset_of_tensor_prompts_with_corrupted_inputs():
    tokens = torch.arange(1, 25).reshape(6, 4)
    corrupted = tokens.flip(-1)
    task = Task(
        tokens,
        answers=torch.arange(30, 36),
        wrong=torch.arange(40, 46),
        corrupted=corrupted,
    )
    idx = [4, 1, 5]
    sub = task.subset(idx)
    assert isinstance(sub.prompts, torch.Tensor) and torch.equal(sub.prompts, tokens[idx])
    assert torch.equal(sub.corrupted, corrupted[idx])
    assert sub.answers.tolist() == [34, 31, 35] and sub.wrong.tolist() == [44, 41, 45]
    full, part = prepare(task), prepare(sub)
    assert torch.equal(part.tokens, full.tokens[idx])
    assert torch.equal(part.corrupted, full.corrupted[idx])
    assert torch.equal(part.inputs.answers, full.inputs.answers[idx])


def test_subset_follows_the_loss_mask():
    mask = torch.tensor(
        [[False, True, True, False], [False, False, True, True], [False, True, False, True]]
    )
    task = Task([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]], metric="loss", loss_mask=mask)
    sub = task.subset([2, 1])
    assert torch.equal(sub.loss_mask, mask[[2, 1]])
    p = prepare(sub)
    assert p.inputs.targets.tolist() == [[14, 16], [11, 12]]


def test_subset_of_string_prompts(tokenizer):
    task = Task(
        ["the cat sat", "a dog", "the mat"], answers=[" on", " the", " on"], wrong=[" the"] * 3
    )
    sub = task.subset([1])
    assert list(sub.prompts) == ["a dog"] and list(sub.answers) == [" the"]
    p = sub.prepare(tokenizer, n_ctx=32, d_vocab=len(tokenizer))
    full = task.prepare(tokenizer, n_ctx=32, d_vocab=len(tokenizer))
    assert p.batch_size == 1 and p.tokens[0].tolist() == full.tokens[1, : p.seq_len].tolist()
    assert p.inputs.answers.tolist() == full.inputs.answers[1:2].tolist()


def test_subset_rejects_bad_indices():
    task = Task([[1, 2], [3, 4], [5, 6]], answers=[1, 2, 3], wrong=[4, 5, 6])
    for bad in ([3], [0, 7], [-1]):
        with pytest.raises(TaskError, match="out of range for 3 prompts"):
            task.subset(bad)
    with pytest.raises(TaskError, match="at least one prompt index"):
        task.subset([])
