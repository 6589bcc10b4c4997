"""Training entry point used by the SLURM tests (``--entry tests.slurm.slurm_entry:train_and_hash``).

It runs the real trainer, ``train.train.main``, unchanged, and afterwards writes a SHA-256 of the rank's final
model weights to ``<output>/weights_rank<RANK>.json`` so the test can check that all ranks end identical.
The trained module is captured by recording the modules wrapped in DistributedDataParallel.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any, Dict, List


def _state_hash(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _output_dir(argv: List[str]) -> str:
    for i, tok in enumerate(argv):
        if tok == "--output":
            return argv[i + 1]
        if tok.startswith("--output="):
            return tok.split("=", 1)[1]
    raise ValueError("no --output in argv")


def train_and_hash(argv: List[str]) -> Dict[str, Any]:
    import torch.nn.parallel as parallel

    import train.train as tt

    wrapped = []
    orig = parallel.DistributedDataParallel

    class _RecordingDDP(orig):  # type: ignore[misc, valid-type]
        def __init__(self, module, *args, **kwargs):
            super().__init__(module, *args, **kwargs)
            wrapped.append(module)

    parallel.DistributedDataParallel = _RecordingDDP
    try:
        result = tt.main(argv)
    finally:
        parallel.DistributedDataParallel = orig
    rank = int(os.environ.get("RANK", "0"))
    info = dict(rank=rank, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")), node=os.environ.get("SLURMD_NODENAME"),
                host=socket.gethostname(), master=f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
                step=int(result["step"]), weights_sha256=_state_hash(wrapped[-1]) if wrapped else None,
                restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    out = _output_dir(argv)
    with open(os.path.join(out, f"weights_rank{rank}.json"), "w") as f:
        json.dump(info, f)
    return dict(result, **info)

