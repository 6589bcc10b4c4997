"""FX helpers: keep data-dependent checks as leaves when a model is symbolically traced.

Usage in a module (torch.fx.wrap must be called at module top level):

    @register_notrace_function
    def my_check(...): ...
    torch.fx.wrap('my_check')
"""
import torch

try:
    from timm.layers import register_notrace_function as _timm_notrace
except ImportError:  # pragma: no cover
    _timm_notrace = None


def register_notrace_function(fn):
    """Add ``fn`` to timm's autowrap list, used by timm / torchvision FX feature extraction."""
    if _timm_notrace is not None:
        _timm_notrace(fn)
    return fn


def is_fx_tracing() -> bool:
    st = torch.fx._symbolic_trace
    fn = getattr(st, 'is_fx_symbolic_tracing', None) or getattr(st, 'is_fx_tracing', None)
    return bool(fn()) if fn is not None else False
