"""slurm.launch without a SLURM cluster: --dry-run, flag handling, the pickled callable, --local mode."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import launch

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY = "tests.slurm.slurm_entry:train_and_hash"
TINY = ["--dataset", "fashion_mnist", "--model", "cbsa_vit_tiny",
        "--model-kwargs", "patch_size=4", "rep_grid=4", "embed_dim=32", "depth=2", "num_heads=2",
        "--max-train-samples", "128", "--max-val-samples", "32", "-b", "16", "--epochs", "1", "--workers", "0",
        "--threads", "1"]


def test_dry_run_prints_sbatch_script_with_requested_resources(tmp_path):
    """(d) --dry-run prints the sbatch script submitit would submit, with every requested resource."""
    job_dir = tmp_path / "exp" / "%j"
    cmd = [sys.executable, "-m", "slurm.launch", "--dry-run", "--nodes", "4", "--gpus-per-node", "8",
           "--partition", "learnlab", "--account", "vision", "--qos", "high", "--constraint", "volta32gb",
           "--exclude", "node[01-03]", "--comment", "cbsa pretraining", "--timeout", "4320", "--mem", "480",
           "--cpus-per-task", "10", "--job-dir", str(job_dir), "--slurm-param", "reservation=cbsa",
           "--setup", "export NCCL_DEBUG=INFO", "--srun-arg=--cpu-bind=none",
           "--model", "cbsa_vit_base", "--epochs", "300", "--batch-size", "128"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                       env={**os.environ, "PATH": "/usr/bin:/bin"})  # no SLURM needed (nor used)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=learnlab", "#SBATCH --account=vision", "#SBATCH --qos=high",
                 "#SBATCH --constraint=volta32gb", "#SBATCH --exclude='node[01-03]'",
                 "#SBATCH --comment='cbsa pretraining'", "#SBATCH --time=4320", "#SBATCH --mem=480GB",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --reservation=cbsa", "#SBATCH --signal=USR2@120",
                 f"#SBATCH --output={job_dir}/%j_0_log.out", "export NCCL_DEBUG=INFO", "--cpu-bind=none",
                 f"{sys.executable} -u -m submitit.core._submit {job_dir}"]:
        assert line in out, f"{line!r} missing from:\n{out}"
    assert "--model cbsa_vit_base --epochs 300 --batch-size 128" in r.stderr
    assert not (tmp_path / "exp").exists()  # nothing submitted, nothing written


def test_dry_run_cpu_job_defaults(tmp_path):
    a, ex, trainer = launch.prepare(["--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "2",
                                     "--job-dir", str(tmp_path / "%j"), *TINY])
    script = launch.dry_run_script(ex)
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --cpus-per-task=1" in script
    assert "gpus-per-node" not in script


def test_training_flags_validated_before_submission(tmp_path, capsys):
    rc = launch.main(["--dry-run", "--job-dir", str(tmp_path / "%j"), "--model"])
    err = capsys.readouterr().err
    assert rc == 2 and "--model: expected one argument" in err and "nothing was submitted" in err
    rc = launch.main(["--dry-run", "--job-dir", str(tmp_path / "%j"), "--epochs", "ten"])
    assert rc == 2 and "invalid int value: 'ten'" in capsys.readouterr().err
    rc = launch.main(["--dry-run", "--job-dir", str(tmp_path / "%j"), "--no-such-training-flag", "1"])
    assert rc == 2 and "unrecognized arguments: --no-such-training-flag" in capsys.readouterr().err
    rc = launch.main(["--dry-run", "--job-dir", str(tmp_path / "%j"), "--config", str(tmp_path / "nope.yaml")])
    assert rc == 2 and "nope.yaml" in capsys.readouterr().err
    rc = launch.main(["--dry-run", "--nodes", "0"])
    assert rc == 2 and "--nodes must be >= 1" in capsys.readouterr().err
    rc = launch.main(["--local", "--nodes", "2"])
    assert rc == 2 and "--local runs on this machine only" in capsys.readouterr().err


def test_argv_split_and_finalize():
    a, train_argv = launch.split_argv(["--nodes", "2", "--model", "cbt_small", "--partition", "p",
                                       "--model-kwargs", "rep_grid=4", "depth=6", "--", "--lr", "1e-3"])
    assert a.nodes == 2 and a.partition == "p" and a.tasks_per_node == 8 and a.cpus_per_task == 10
    assert train_argv == ["--model", "cbt_small", "--model-kwargs", "rep_grid=4", "depth=6", "--lr", "1e-3"]
    out = launch.finalize_train_argv(train_argv, "/ckpt/123", "123")
    assert out[-4:] == ["--output", "/ckpt/123", "--resume", "auto"]
    out = launch.finalize_train_argv(["--output", "/x/%j/run", "--resume", "auto"], "/ckpt/7", "7")
    assert out == ["--output", "/x/7/run", "--resume", "auto"]
    assert launch.master_port_for("123456") == 20000 + 123456 % 20000
    assert launch.master_port_for("77_3") == 20077


def test_pickled_job_has_no_resume_path_and_checkpoint_requeues_same_args(tmp_path):
    a, ex, trainer = launch.prepare(["--dry-run", "--job-dir", str(tmp_path / "%j"), *TINY])
    blob = pickle.dumps(trainer)
    assert b".pth" not in blob and b"--resume" not in blob
    t2 = pickle.loads(blob)
    assert (t2.entry, t2.train_argv, t2.output_template) == (trainer.entry, trainer.train_argv,
                                                             trainer.output_template)
    delayed = trainer.checkpoint()
    nxt = delayed.function
    assert type(nxt) is launch.Trainer and nxt is not trainer
    assert (nxt.entry, nxt.train_argv, nxt.output_template) == (trainer.entry, trainer.train_argv,
                                                                trainer.output_template)
    assert delayed.args == () and delayed.kwargs == {}


@pytest.mark.timeout(300)
def test_local_mode_runs_the_same_code_without_slurm(tmp_path, monkeypatch):
    """--local: submitit LocalExecutor, 2 processes, gloo DDP, same Trainer callable; identical weights."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv("SLURM_CONF", raising=False)
    job = launch.submit(["--local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout", "10",
                         "--job-dir", str(tmp_path / "%j"), "--entry", ENTRY, *TINY, "--max-steps", "3"])
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["step"] == 3 for r in results)
    folder = Path(str(job.paths.folder))
    hashes = {json.loads(f.read_text())["weights_sha256"] for f in folder.glob("weights_rank*.json")}
    assert len(hashes) == 1 and None not in hashes
    assert (folder / "last.pth.tar").exists() or list(folder.glob("checkpoint-*.pth.tar"))
