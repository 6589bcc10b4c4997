"""Tracing helpers: whether the code runs under an exporter or FX, and FX leaves for data-dependent calls."""
import torch
from timm.layers import register_notrace_function

__all__ = ['fx_leaf', 'is_exporting', 'is_fx_tracing']


@torch.jit.unused
def is_exporting() -> bool:
    """True while ``torch.onnx.export`` (the TorchScript-based exporter) or ``torch.export`` (also behind
    ``torch.onnx.export(dynamo=True)``) traces the model. Call it behind ``not torch.jit.is_scripting()``."""
    return torch.onnx.is_in_onnx_export() or _torch_export_tracing()


_torch_export_tracing = getattr(torch.compiler, 'is_exporting', lambda: False)   # torch >= 2.5 (the floor is 2.4)


def is_fx_tracing() -> bool:
    """True while ``torch.fx.symbolic_trace`` traces the caller."""
    st = torch.fx._symbolic_trace
    fn = getattr(st, 'is_fx_symbolic_tracing', None) or getattr(st, 'is_fx_tracing', None)
    return bool(fn()) if fn is not None else False


def fx_leaf(fn):
    """Register ``fn`` with timm's FX autowrap list (timm / torchvision feature extraction keep it as one call);
    the module that calls ``fn`` must also call ``torch.fx.wrap('<name>')`` at top level for ``torch.fx``."""
    return register_notrace_function(fn)
