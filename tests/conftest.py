import os
import shutil
import tempfile


# Offline and quiet before anything imports huggingface_hub (its constants are read at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
_HF_HOME = tempfile.mkdtemp(prefix="hf_mlsafety_tests_home_")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# A loopback fake Hub for the push tests. HF_ENDPOINT must point at it before huggingface_hub is imported; every other
# test stays in offline mode, and the `hub` fixture lifts it for the Hub tests only.
from hf_mlsafety.testing_hub import FakeHub  # noqa: E402


FAKE_HUB = FakeHub(root=tempfile.mkdtemp(prefix="hf_mlsafety_fake_hub_")).start()
os.environ["HF_ENDPOINT"] = FAKE_HUB.endpoint
os.environ["HF_TOKEN"] = "hf_fake_token_for_tests_0123456789"

import pytest  # noqa: E402

from hf_mlsafety.testing import tiny_model_path  # noqa: E402


# Evaluation data lives beside the checkout, never inside it.
EVAL_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "eval-data")


@pytest.fixture(scope="session")
def tiny_model_dir():
    """A tiny Llama model + tokenizer folder, built once per test session."""
    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def multijail_csv():
    """Path of the MultiJail CSV kept beside the checkout (../shared/eval-data); tests using it skip when absent."""
    path = os.path.join(EVAL_DATA, "MultiJail.csv")
    if not os.path.isfile(path):
        pytest.skip("MultiJail.csv is evaluation data kept outside the repository (../shared/eval-data); absent here")
    return path


@pytest.fixture
def hub(monkeypatch):
    """The loopback fake Hub (127.0.0.1 only), emptied, with offline mode lifted for this test."""
    import huggingface_hub

    assert FAKE_HUB.endpoint.startswith("http://127.0.0.1:"), "Hub tests only run against the loopback fake Hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    FAKE_HUB.clear()
    return FAKE_HUB


def pytest_unconfigure(config):
    FAKE_HUB.stop()
    shutil.rmtree(FAKE_HUB.root, ignore_errors=True)
    shutil.rmtree(_HF_HOME, ignore_errors=True)
