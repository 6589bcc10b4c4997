"""Hand-written GPU kernels (Triton). ``cbsa``: the contract-and-broadcast core of CBSA (``backend='triton'``)."""
