"""Helpers shared by the backend parity tests (tests/layers and tests/gpu); on the path through pytest's
``pythonpath`` setting in pyproject.toml."""
import torch


def run_fwd_bwd(layer, x, backend):
    """Forward + backward of ``layer`` on ``backend`` against a fixed non-uniform output gradient; returns the
    output, the input gradient and every parameter gradient, in float32."""
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_()
    y = layer(xx)
    g = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=torch.float32).reshape(y.shape).to(y.dtype)
    (y * g).sum().backward()
    return [y.detach().float(), xx.grad.float()] + [p.grad.float() for p in layer.parameters()]


def rel_errors(a, b):
    """Per pair: max |u − v| / max |v|."""
    return [((u - v).abs().max() / v.abs().max().clamp_min(1e-12)).item() for u, v in zip(a, b)]
