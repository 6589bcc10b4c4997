"""Guards that turn silent failures into errors: one ImageFolder class map, the run-folder lock and fresh-run
refusal, flag validation for the SLURM launcher, config merging, model-build checks on resume, and the rule that
every collective runs on the training device through one helper."""
import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.checkpoint import RunFolderError, RunLock, atomic_torch_save, clean_stale_tmp  # noqa: E402
from train.checkpoint import CheckpointError, find_resume_checkpoint  # noqa: E402
from train.train import (  # noqa: E402
    Collectives, ConfigError, ModelNotFoundError, main, parse_args, validate_args,
)
from timm_cbsa.data import DatasetNotFoundError  # noqa: E402

TINY = ["--dataset", "synthetic", "--img-size", "16", "--num-classes", "4",
        "--model", "cbsa_vit_tiny", "--model-kwargs", "patch_size=4", "rep_grid=2", "embed_dim=32", "depth=1",
        "num_heads=2", "--batch-size", "16", "--max-train-samples", "64", "--max-val-samples", "32",
        "--opt", "adamw", "--lr", "3e-3", "--workers", "0", "--seed", "1", "--epochs", "1",
        "--color-jitter", "0", "--threads", "1", "--quiet"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------------- ImageFolder class map

def _tree(root, layout):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for c, n in classes.items():
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)).save(d / f"{i}.png")


def _folder_run(root):
    return ["--dataset", "imagefolder", "--data-dir", str(root), "--img-size", "16", "--num-classes", "3",
            "--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=1",
            "num_heads=2", "--batch-size", "4", "--epochs", "1", "--output", str(root / "out"), "--quiet",
            "--threads", "1"]


def test_empty_class_folder_in_one_split_is_an_error_naming_it(tmp_path):
    _tree(tmp_path, {"train": {"a": 4, "b": 0, "c": 4}, "val": {"a": 2, "b": 2, "c": 2}})
    with pytest.raises(DatasetNotFoundError, match=r"train/b' has no image files"):
        main(_folder_run(tmp_path))


def test_class_missing_from_a_split_is_an_error_naming_it(tmp_path):
    _tree(tmp_path, {"train": {"a": 4, "c": 4}, "val": {"a": 2, "b": 2, "c": 2}})
    with pytest.raises(DatasetNotFoundError, match=r"train' has no folder for class\(es\) \['b'\]"):
        main(_folder_run(tmp_path))


def test_splits_share_one_class_map(tmp_path):
    from train.data import image_folder_class_map
    _tree(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "b": 1, "c": 1}})
    assert image_folder_class_map(str(tmp_path), ["train", "validation"]) == {"a": 0, "b": 1, "c": 2}


# ---------------------------------------------------------------------------- run folder

def test_fresh_run_into_a_previous_run_is_refused_unless_overwrite(tmp_path):
    main(TINY + ["--output", str(tmp_path)])
    before = (tmp_path / "last.pth.tar").stat().st_mtime_ns
    with pytest.raises(RunFolderError, match=r"holds a previous run .*--resume auto.*--overwrite"):
        main(TINY + ["--output", str(tmp_path)])
    assert (tmp_path / "last.pth.tar").stat().st_mtime_ns == before
    main(TINY + ["--output", str(tmp_path), "--overwrite"])
    assert len((tmp_path / "summary.csv").read_text().strip().splitlines()) == 2  # header + this run's epoch


def test_folder_locked_by_a_live_process_is_refused_then_taken_over_when_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from train.checkpoint import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {holder.pid} on host"):
            main(TINY + ["--output", str(tmp_path)])
        assert not (tmp_path / "last.pth.tar").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    main(TINY + ["--output", str(tmp_path)])  # the kernel dropped the dead holder's flock: no manual clean-up
    assert (tmp_path / "last.pth.tar").exists()
    with RunLock(str(tmp_path)):  # released at exit
        pass


def test_two_concurrent_runs_one_is_refused(tmp_path):
    # --resume auto for both: a second run may continue a folder, but never while another run is in it
    cmd = [sys.executable, "-m", "train.train"] + TINY + ["--output", str(tmp_path), "--resume", "auto",
                                                          "--debug-step-delay", "4"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / ".lock").exists() or not (tmp_path / ".lock").read_text():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    out1 = first.communicate(timeout=120)[0]
    assert first.returncode == 0, out1[-2000:]
    assert second.returncode == 2 and "in use by another run" in second.stderr, second.stderr[-2000:]


def test_stale_tmp_cleanup_spares_live_writers(tmp_path):
    import socket
    host = socket.gethostname().split(".")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live_name = f".last.pth.tar.{host}.{os.getpid()}.abcd1234.tmp"
    dead_name = f".last.pth.tar.{host}.{int(dead.stdout)}.abcd1234.tmp"
    other = "notes.tmp"
    for n in (live_name, dead_name, other):
        (tmp_path / n).write_bytes(b"partial")
    assert clean_stale_tmp(str(tmp_path)) == [dead_name]
    assert (tmp_path / live_name).exists() and (tmp_path / other).exists()


# ---------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--lr", "-1"), ("-b", "0"), ("--batch-size", "0"),
                                        ("--grad-accum-steps", "0"), ("--log-interval", "0")])
def test_bad_numbers_name_the_flag(flag, value):
    name = "--batch-size" if flag == "-b" else flag
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        parse_args(["--dataset", "synthetic", flag, value])


def test_validate_args_checks_model_and_data(tmp_path):
    validate_args(parse_args(TINY))
    with pytest.raises(ModelNotFoundError, match="cbsa_vit_gigantic"):
        validate_args(parse_args(["--model", "cbsa_vit_gigantic", "--dataset", "synthetic"]))
    args = parse_args(["--dataset", "", "--data-dir", str(tmp_path / "nope")])
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        validate_args(args)
    validate_args(args, check_paths=False)  # data only on the cluster: skip the path check


def test_cli_model_kwargs_merge_over_the_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_kwargs: {patch_size: 7, rep_grid: 2, depth: 4}\nopt_kwargs: {foo: 1}\n")
    a = parse_args(["--config", str(cfg), "--model-kwargs", "rep_grid=8"])
    assert a.model_kwargs == {"patch_size": 7, "rep_grid": 8, "depth": 4}
    assert parse_args(["--config", str(cfg)]).model_kwargs == {"patch_size": 7, "rep_grid": 2, "depth": 4}


def test_lr_base_scales_with_the_global_batch():
    from train.train import resolve_lr
    a = parse_args(["--dataset", "synthetic", "--lr-base", "0.1", "--lr-base-size", "256", "--opt", "sgd"])
    assert resolve_lr(a, 1024) == pytest.approx(0.4)
    a = parse_args(["--dataset", "synthetic", "--lr-base", "1e-3", "--opt", "adamw"])
    assert resolve_lr(a, 1024) == pytest.approx(2e-3)  # sqrt for adaptive optimizers
    assert resolve_lr(parse_args(["--dataset", "synthetic", "--lr", "0.5", "--lr-base", "1"]), 1024) == 0.5


# ---------------------------------------------------------------------------- model build recorded

def test_resume_into_a_model_built_differently_is_refused(tmp_path):
    main(TINY + ["--output", str(tmp_path), "--epochs", "1"])
    ck = find_resume_checkpoint(str(tmp_path))[1]
    assert ck["model_config"]["model"] == "cbsa_vit_tiny"
    assert ck["model_config"]["cbsa"]["rep_grid"] == [2, 2]
    other = [a if a != "rep_grid=2" else "rep_grid=1" for a in TINY]  # same parameter shapes, other pooling
    with pytest.raises(CheckpointError, match=r"--model-kwargs rep_grid=2 \(this run: rep_grid=1\)"):
        main(other + ["--output", str(tmp_path), "--epochs", "2", "--resume", "auto"])
    with pytest.raises(CheckpointError, match=r"--model-kwargs rep_grid=2 \(this run: rep_grid=1\)"):
        main(other + ["--output", str(tmp_path / "ft"), "--initial-checkpoint", str(tmp_path / "last.pth.tar")])


# ---------------------------------------------------------------------------- collectives

def test_collectives_refuse_tensors_on_another_device():
    c = Collectives(torch.device("meta"), world=2)
    with pytest.raises(RuntimeError, match="tensor on cpu; the training device is meta"):
        c.sum_(torch.zeros(3))


def test_every_collective_in_train_goes_through_the_helper():
    """No torch.distributed collective outside train.train.Collectives (which checks devices)."""
    collectives = {"all_reduce", "broadcast", "all_gather", "all_gather_object", "reduce", "gather",
                   "scatter", "reduce_scatter", "all_to_all", "broadcast_object_list", "all_reduce_coalesced"}
    offenders = []
    for path in (ROOT / "train").glob("*.py"):
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "Collectives":
                allowed |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in collectives and id(node) not in allowed:
                offenders.append(f"{path.name}:{node.lineno} {node.func.attr}")
    assert not offenders, offenders


def test_loop_hands_only_training_device_tensors_to_collectives(tmp_path, monkeypatch):
    """Record every tensor the loop gives the helper (sync points, evaluation, lock agreement, barrier)."""
    seen = []
    real = Collectives._check

    def record(self, t):
        seen.append((t.device, self.device))
        real(self, t)
    monkeypatch.setattr(Collectives, "_check", record)
    main(TINY + ["--output", str(tmp_path), "--log-interval", "1"])
    assert len(seen) >= 6 and all(a == b for a, b in seen), seen
