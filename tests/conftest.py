import os

import pytest
import torch

# Tiny models on 2 cores: thread contention costs 10-100x, so every test runs single-threaded by default.
# WEIBULL_TEST_THREADS=2 runs the suite with 2 intra-op threads (a different float summation order): the tests that
# train a model (marker ``trains``) must pass either way, and under ATEN_CPU_CAPABILITY=default/avx2/avx512 too.
TEST_THREADS = int(os.environ.get("WEIBULL_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)
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
