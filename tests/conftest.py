"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, built once per cache."""

from __future__ import annotations

import pytest

from agents.model import TINY_MODEL, resolve_model


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    return str(resolve_model(TINY_MODEL))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from agents.model import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def formatter(tokenizer):
    from agents.chat import ChatFormatter

    return ChatFormatter(tokenizer)
