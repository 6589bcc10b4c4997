"""Operators behind the CBSA layers. ``contract_broadcast``: CBSA's extraction, contraction and broadcast."""
