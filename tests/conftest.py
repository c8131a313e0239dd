"""Test environment: offline, deterministic, tiny models built once per machine.

Tests never reach a model hub (HF_HUB_OFFLINE=1); embedded tiny models are built into the
repository's .cache/models (or $CONCEPTFLOW_CACHE) the first time a test needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("CONCEPTFLOW_CACHE", str(ROOT / ".cache" / "models"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data" / "dreambooth"


@pytest.fixture(scope="session")
def tiny_sd_path() -> Path:
    from conceptflow.models.embedded import embedded_model_path

    return embedded_model_path("embedded:tiny-sd")


@pytest.fixture
def tiny_pipeline(tiny_sd_path):
    """A fresh tiny SD pipeline (each test may modify it)."""
    from conceptflow.models.loading import load_base_pipeline

    torch.manual_seed(0)
    return load_base_pipeline("embedded:tiny-sd")


@pytest.fixture
def concept_pipeline(tiny_pipeline):
    """The tiny base with random layer-wise tokens for <dog> and <cat> (the samplers' tests)."""
    from conceptflow.adapters.tokens import concept_token_strings, write_embeddings
    from conceptflow.attention.processor import attention_controller_of

    n_layers = attention_controller_of(tiny_pipeline.unet).n_cross_layers
    generator = torch.Generator().manual_seed(0)
    write_embeddings(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder,
                     {token: torch.randn(32, generator=generator)
                      for name in ("dog", "cat") for token in concept_token_strings(name, n_layers)})
    return tiny_pipeline


@pytest.fixture
def dreambooth_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real DreamBooth photos not found at {SHARED_DATA} (the shared/ folder is absent)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tiny models: two threads on a busy 2-core CPU spin ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
