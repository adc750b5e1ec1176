"""The offline model zoo: small reference/intervened pairs with known (or declared unknown)
ground truth, trained on CPU by this package's own seeded code and shipped inside it.

>>> from mechdelta import zoo
>>> entry = zoo.load("planted")            # no download, no training
>>> entry.pair, entry.task, entry.ground_truth, entry.card

Entries: ``induction`` (training dynamics; ground truth = induction and previous-token heads by
attention scores), ``planted`` (shift confined to chosen components by construction; see
:func:`planted_pair`), ``null`` (no shift; ground truth empty), ``finetune`` (full fine-tune;
ground truth unknown). ``mechdelta zoo list`` / ``mechdelta zoo build NAME`` on the command line.
"""

from mechdelta.zoo._card import Behaviour, Stage, ZooCard
from mechdelta.zoo._entry import ZooEntry
from mechdelta.zoo._registry import build, data_dir, describe, load, names
from mechdelta.zoo._scores import induction_scores, previous_token_scores
from mechdelta.zoo.planted import component_masks, planted_pair

__all__ = [
    "Behaviour",
    "Stage",
    "ZooCard",
    "ZooEntry",
    "build",
    "component_masks",
    "data_dir",
    "describe",
    "induction_scores",
    "load",
    "names",
    "planted_pair",
    "previous_token_scores",
]
