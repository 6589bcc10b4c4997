"""Streaming data: webdataset tar shards written from Fashion-MNIST train through timm's wds reader, and resume."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("webdataset", reason="timm's wds reader needs webdataset (pip install webdataset)")

from train.checkpoint import find_resume_checkpoint, load_checkpoint_file  # noqa: E402
from timm_cbsa.data import DEFAULT_FASHION_MNIST_DIR, FashionMNIST  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR),
                                reason="apt package dataset-fashion-mnist absent")

N_TRAIN, N_VAL, SHARD = 384, 64, 96  # 4 train shards, 1 val shard


def write_shards(root: Path):
    """webdataset layout: <key>.png + <key>.cls per sample, tar shards, _info.json with the split sizes."""
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    info = {"name": "fmnist-wds", "splits": {}}
    for split, src, n in (("train", "train", N_TRAIN), ("validation", "test", N_VAL)):
        ds = FashionMNIST(split=src, max_samples=n)
        files, lengths = [], []
        for s, start in enumerate(range(0, n, SHARD)):
            name = f"fmnist-{split}-{s:04d}.tar"
            with tarfile.open(root / name, "w") as tar:
                for i in range(start, min(start + SHARD, n)):
                    buf = io.BytesIO()
                    Image.fromarray(ds.images[i]).save(buf, format="PNG")
                    for ext, data in (("png", buf.getvalue()), ("cls", str(int(ds.targets[i])).encode())):
                        ti = tarfile.TarInfo(f"{split}_{i:06d}.{ext}")
                        ti.size = len(data)
                        tar.addfile(ti, io.BytesIO(data))
            files.append(name)
            lengths.append(min(start + SHARD, n) - start)
        info["splits"][split] = {"name": split, "num_samples": n, "filenames": files, "shard_lengths": lengths}
    (root / "_info.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("wds"))


def _run(shards, out, extra=(), check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "train.train", "--dataset", "wds/fmnist", "--data-dir", str(shards),
           "--train-split", "train", "--val-split", "validation", "--img-size", "28", "--in-chans", "1",
           "--num-classes", "10", "--mean", "0.286", "--std", "0.353", "--crop-pct", "1.0",
           "--model", "cbsa_vit_tiny", "--model-kwargs", "patch_size=7", "rep_grid=2", "embed_dim=32", "depth=1",
           "num_heads=2", "--batch-size", "32", "--epochs", "2", "--opt", "adamw", "--lr", "3e-3",
           "--scale", "1.0", "1.0", "--ratio", "1.0", "1.0", "--color-jitter", "0", "--workers", "0",
           "--threads", "1", "--log-interval", "2", "--output", str(out)] + list(extra)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_wds_shards_train_and_resume_mid_epoch(shards, tmp_path):
    steps_per_epoch = N_TRAIN // 32
    # preempted mid-epoch 1 (SIGTERM at step 16 = epoch 1, batch 4), then --resume auto
    p = _run(shards, tmp_path / "run", ["--debug-signal-at-step", "16", "--debug-signal",
                                        str(int(signal.SIGTERM))], check=False)
    assert p.returncode == -signal.SIGTERM, p.stdout[-3000:] + p.stderr[-3000:]
    path, ck = find_resume_checkpoint(str(tmp_path / "run"))
    assert ck["global_step"] == 16 and ck["epoch"] == 1 and ck["batches_done"] == 16 - steps_per_epoch
    p = _run(shards, tmp_path / "run", ["--resume", "auto"])
    log = p.stdout + p.stderr
    assert "global step 16" in log and "restarts its shard stream and trains its remaining 8 batches" in log
    ck = load_checkpoint_file(str(tmp_path / "run" / "last.pth.tar"))
    assert ck["global_step"] == 2 * steps_per_epoch and ck["epoch"] == 1 and ck["epoch_complete"]
    rows = (tmp_path / "run" / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header, epoch 0 (first process), epoch 1 (resumed process)


@pytest.mark.slow
def test_wds_shards_train_and_resume_at_the_epoch_boundary(shards, tmp_path):
    p = _run(shards, tmp_path / "a", ["--max-steps", str(N_TRAIN // 32)])
    assert "data wds/fmnist: 384 train" in p.stdout + p.stderr
    ck = load_checkpoint_file(str(tmp_path / "a" / "last.pth.tar"))
    assert ck["global_step"] == N_TRAIN // 32 and ck["epoch_complete"] and ck["epoch"] == 0
    p = _run(shards, tmp_path / "a", ["--resume", "auto"])
    assert f"global step {N_TRAIN // 32}" in p.stdout + p.stderr
    assert load_checkpoint_file(str(tmp_path / "a" / "last.pth.tar"))["global_step"] == 2 * (N_TRAIN // 32)
