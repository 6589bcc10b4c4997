"""CBSA's contract-and-broadcast core as Triton kernels (fla-org layout: ``naive.py`` the PyTorch twin,
``kernels.py`` the Triton kernels, ``function.py`` their autograd function and support checks). Importing this
package does not import Triton; the kernels are loaded on first use."""
from .function import (MAX_HEAD_DIM, MAX_REPRESENTATIVES, TritonContractBroadcast, contract_and_broadcast_triton,
                       triton_probe, triton_unsupported_reason)
from ..naive import naive_contract_and_broadcast

__all__ = ['TritonContractBroadcast', 'contract_and_broadcast_triton', 'naive_contract_and_broadcast',
           'triton_probe', 'triton_unsupported_reason', 'MAX_HEAD_DIM', 'MAX_REPRESENTATIVES']
