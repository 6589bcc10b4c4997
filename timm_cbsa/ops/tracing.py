"""Whether the code runs under an exporter (the operator then takes paths every exporter understands)."""
import torch

__all__ = ['is_exporting']


@torch.jit.unused
def is_exporting() -> bool:
    """True while ``torch.onnx.export`` (the TorchScript-based exporter) or ``torch.export`` (also behind
    ``torch.onnx.export(dynamo=True)``) traces the model. Call it behind ``not torch.jit.is_scripting()``."""
    return torch.onnx.is_in_onnx_export() or _torch_export_tracing()


_torch_export_tracing = getattr(torch.compiler, 'is_exporting', lambda: False)   # torch >= 2.5 (the floor is 2.4)


def fx_leaf(fn):
    """Register ``fn`` with timm's FX autowrap list (timm / torchvision feature extraction keep it as one call);
    the module that calls ``fn`` must also call ``torch.fx.wrap('<name>')`` at top level for ``torch.fx``."""
    try:
        from timm.layers import register_notrace_function
    except ImportError:  # pragma: no cover
        return fn
    return register_notrace_function(fn)
