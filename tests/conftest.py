"""Shared fixtures: tiny models built from configs, seeded; tiny HF checkpoints on disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from tests import _builders

# Tiny models: on the 2-core machines a d_model-64 forward measured 6-20x slower with torch's 2
# threads than with 1 (threading overhead, no gain), so the whole suite runs on one thread.
torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def hf_checkpoints_seed1(tmp_path_factory, tokenizer):
    """Seed-1 twins of :func:`hf_checkpoints` (same architecture and tokenizer, other weights)."""
    root = tmp_path_factory.mktemp("checkpoints-seed1")
    return {
        family: _builders.save_checkpoint(root, family, tokenizer, seed=1)
        for family in _builders.FAMILIES
    }


@pytest.fixture(scope="session")
def hf_pairs(hf_checkpoints, hf_checkpoints_seed1):
    """``{family: ModelPair}``: seed-0 reference, seed-1 intervened (shared: do not modify)."""
    from mechdelta import ModelPair

    return {
        family: ModelPair.load(hf_checkpoints[family], hf_checkpoints_seed1[family], device="cpu")
        for family in _builders.FAMILIES
    }
