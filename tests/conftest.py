"""Shared test fixtures.

`../shared` (beside the repository) holds read-only reference fixtures. Tests that need it skip when it is
absent, except under CI=true, where its absence is a failure.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "finetune_chatmodel_demo"
DATA = REPO / "data_processing"
SHARED = REPO.parent / "shared"



def _require_shared() -> Path:
    if SHARED.is_dir():
        return SHARED
    if os.environ.get("CI") == "true":
        pytest.fail(f"../shared is missing ({SHARED}); CI must run with the shared fixtures beside the clone")
    pytest.skip(f"../shared not found at {SHARED}")


@pytest.fixture(scope="session")
def shared() -> Path:
    """Path to the read-only ../shared fixtures (skip, or fail under CI=true, when absent)."""
    return _require_shared()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-weight ChatGLM3 (2 layers, hidden 64) with a SentencePiece tokenizer trained on the
    bundled Pokémon table, in the official checkpoint format."""
    from build_tiny_model import build_tiny_model

    corpus = DATA / "data.csv"
    if not corpus.is_file():
        pytest.fail(f"bundled corpus missing: {corpus}")
    return build_tiny_model(corpus, tmp_path_factory.mktemp("tiny-chatglm3"), seed=0)


@pytest.fixture(scope="session")
def real_tokenizer():
    """The real ChatGLM3-6B tokenizer (64,798 tokens) from ../shared; in a clone without it, THUDM/chatglm3-6b's
    tokenizer files from the Hugging Face cache or the Hub (about 1 MB) when the network allows, else a skip."""
    from chatglm3 import ChatGLMTokenizer

    from chatglm3 import hub

    if SHARED.is_dir():
        return ChatGLMTokenizer.from_pretrained(str(SHARED / "chatglm3-tokenizer"))
    try:
        return ChatGLMTokenizer.from_pretrained(hub.resolve("THUDM/chatglm3-6b", need="tokenizer"))
    except hub.HubError:
        _require_shared()


@pytest.fixture(scope="session")
def tokenizer_golden(shared) -> dict:
    """Upstream's reference token ids and labels (../shared/parity/tokenizer_golden.json)."""
    import json

    return json.loads((shared / "parity" / "tokenizer_golden.json").read_text(encoding="utf-8"))
