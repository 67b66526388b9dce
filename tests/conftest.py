import os
import sys
from pathlib import Path

# No test may reach the network: the Hugging Face hub client stays offline unless a test serves a fake hub.
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny ViT-B-32-shaped model with random weights, saved as a clipworks directory (`local-dir:` it)."""
    import torch

    import clipworks
    from reference import tiny_config

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    clipworks.save_pretrained(clipworks.create_model(tiny_config(clipworks.get_preset("ViT-B-32"))), root / "m")
    return root / "m"
