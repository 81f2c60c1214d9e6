from __future__ import annotations

import pytest

from server.testmodel import make_test_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random GPT-2 (2 layers, 128 wide, std 0.12) saved with save_pretrained + tokenizer."""
    return make_test_model(tmp_path_factory.mktemp("tiny-gpt2"), size="tiny", seed=0)
