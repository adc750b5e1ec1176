"""Shared fixtures: tiny models built from configs, seeded; tiny HF checkpoints on disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from tests import _builders

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    return _builders.train_tokenizer()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory, tokenizer):
    """Directories of tiny GPT-2, GPT-NeoX and Llama (GQA) checkpoints, each with a tokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        family: _builders.save_checkpoint(root, family, tokenizer) for family in _builders.FAMILIES
    }


@pytest.fixture
def native_pair_factory():
    return _builders.native_pair
