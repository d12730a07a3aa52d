import os

import pytest
import torch

# Tiny models on 2 cores: thread contention costs 10-100x, so every test runs single-threaded.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
