"""CBSA's contract-and-broadcast core as Triton kernels (fla-org layout: ``../naive.py`` the PyTorch twin,
``kernels.py`` the Triton kernels, ``function.py`` their launches, autograd function and static support checks).
Importing this package does not import Triton; the kernels are loaded on first use."""
from .function import (MAX_HEAD_DIM, MAX_REPRESENTATIVES, MAX_TOKENS, TritonContractBroadcast,
                       contract_and_broadcast_triton, naive_backward, not_supported_reasons)

__all__ = ['TritonContractBroadcast', 'contract_and_broadcast_triton', 'naive_backward', 'not_supported_reasons',
           'MAX_HEAD_DIM', 'MAX_REPRESENTATIVES', 'MAX_TOKENS']
