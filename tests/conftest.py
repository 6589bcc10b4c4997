import os
import warnings

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
warnings.filterwarnings('ignore', message='.*is_fx_tracing.*')

import timm_cbsa  # noqa: E402,F401  (registers the models)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
