"""slurm.launch without a SLURM cluster: --dry-run, flag handling, the pickled callable, --local mode."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import job as slurm_job
from slurm import launch
from slurm import script as slurm_script
from train import args as train_args
from train.checkpoint import find_resume_checkpoint

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
    a, trainer = launch.prepare(["--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "2",
                                 "--job-dir", str(tmp_path / "%j"), *TINY])
    script = launch.dry_run_script(a, trainer)
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
    out = slurm_job.training_argv(train_argv, "/ckpt/123", "123")
    assert out[-4:] == ["--output", "/ckpt/123", "--resume", "auto"]
    out = slurm_job.training_argv(["--output", "/x/%j/run", "--resume", "auto"], "/ckpt/7", "7")
    assert out == ["--output", "/x/7/run", "--resume", "auto"]


def test_pickled_job_has_no_resume_path_and_checkpoint_requeues_same_args(tmp_path):
    a, trainer = launch.prepare(["--dry-run", "--job-dir", str(tmp_path / "%j"), *TINY])
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
    port = _free_port()
    job = launch.submit(*launch.prepare(["--local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout", "10",
                                         "--master-port", str(port), "--job-dir", str(tmp_path / "%j"),
                                         "--entry", ENTRY, *TINY, "--max-steps", "3"]))
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["step"] == 3 for r in results)
    assert {r["master"].rsplit(":", 1)[1] for r in results} == {str(port)}  # --master-port reached every task
    folder = Path(str(job.paths.folder))
    hashes = {json.loads(f.read_text())["weights_sha256"] for f in folder.glob("weights_rank*.json")}
    assert len(hashes) == 1 and None not in hashes
    assert find_resume_checkpoint(str(folder))[1]["global_step"] == 3, sorted(p.name for p in folder.iterdir())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- --script (timm's train.py & co)

def _fake_ckpt(path: Path, global_step: int) -> Path:
    """A checkpoint the trainer's finder accepts (train.checkpoint.load_checkpoint_file)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": global_step}, path)
    return path


def test_script_job_argv_keeps_the_run_folder_stable_and_resumes_from_the_newest(tmp_path):
    job = str(tmp_path / "123")
    argv, run_dir, newest = slurm_script.job_argv(["--model", "m", "--data-dir", "/d/%j"], job, "123")
    assert argv == ["--model", "m", "--data-dir", "/d/123", "--output", job, "--experiment", "train"]
    assert run_dir == os.path.join(job, "train") and newest is None
    # --output given without --experiment: the job id names the run folder (timm's default has a time stamp)
    argv, run_dir, _ = slurm_script.job_argv(["--output", str(tmp_path / "o")], job, "123")
    assert argv[-2:] == ["--experiment", "123"] and run_dir == str(tmp_path / "o" / "123")
    # the newest checkpoint of the run folder (highest global step) wins over the user's --resume, which only
    # starts the first run; timm's checkpoints carry their argparse.Namespace, which must not stop the search
    _fake_ckpt(tmp_path / "o" / "e" / "checkpoint-0.pth.tar", 5)
    import argparse

    import torch
    ck = tmp_path / "o" / "e" / "recovery-0-9.pth.tar"
    torch.save({"state_dict": {}, "global_step": 9, "args": argparse.Namespace(model="m")}, ck)
    user = ["--output", str(tmp_path / "o"), "--experiment=e", "--resume", "/pretrained/start.pth.tar", "-b", "8"]
    argv, run_dir, newest = slurm_script.job_argv(user, job, "123")
    assert newest == str(ck) and argv == [*user, "--resume", str(ck)]
    assert run_dir == str(tmp_path / "o" / "e")


def test_training_argv_resumes_auto_once_the_run_folder_has_a_checkpoint(tmp_path):
    """train.train entry: an explicit --resume PATH starts the first run only; the flags the launcher adds come
    last, so they are what the trainer's parser reads."""
    job = str(tmp_path / "123")
    out = slurm_job.training_argv(["--resume", "/p.pth.tar"], job, "123")
    assert out == ["--resume", "/p.pth.tar", "--output", job]  # nothing to resume from yet
    _fake_ckpt(tmp_path / "o" / "e" / "last.pth.tar", 4)
    out = slurm_job.training_argv(["--resume", "/p.pth.tar", "--output", str(tmp_path / "o"), "--experiment", "e"],
                                  job, "123")
    parsed = train_args.parse_args(out)
    assert (parsed.resume, parsed.output) == ("auto", str(tmp_path / "o"))
    # the recipes' --config files name an output folder: the job folder replaces it (one folder per job), while an
    # --output on the command line (abbreviated, as the trainer's parser allows) stays
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output: {tmp_path / 'from_config'}\nepochs: 2\n")
    parsed = train_args.parse_args(slurm_job.training_argv(["--config", str(cfg)], job, "123"))
    assert (parsed.output, parsed.epochs, parsed.resume) == (job, 2, "auto")
    out = slurm_job.training_argv(["--config", str(cfg), "--out", str(tmp_path / "mine")], job, "123")
    assert train_args.parse_args(out).output == str(tmp_path / "mine")


STANDIN = '''
import argparse, sys
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="resnet18")
parser.add_argument("--data-dir", default=None)
parser.add_argument("--device-modules", nargs="*", default=None)
parser.add_argument("--epochs", type=int, default=1)
def _parse_args():
    args = parser.parse_args()
    return args, "text"
if __name__ == "__main__":
    raise SystemExit("must not run at validation")
'''


def test_script_flags_validated_before_submission(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(STANDIN)
    base = ["--dry-run", "--job-dir", str(tmp_path / "%j"), "--script", str(script)]
    assert launch.main([*base, "--model", "resnet18", "--data-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"script {script}" in err
    rc = launch.main([*base, "--epochs", "x"])
    assert rc == 2 and "invalid int value: 'x'" in capsys.readouterr().err
    rc = launch.main([*base, "--model", "cbsa_vit_tiny"])  # not registered without timm_cbsa imported first
    err = capsys.readouterr().err
    if rc == 2:  # timm_cbsa may already be imported in this process
        assert "--model cbsa_vit_tiny: no such timm model" in err and "--device-modules timm_cbsa" in err
    rc = launch.main([*base, "--device-modules", "timm_cbsa", "--model", "no_such_model_xyz"])
    assert rc == 2 and "--model no_such_model_xyz: no such timm model" in capsys.readouterr().err
    rc = launch.main([*base, "--device-modules", "timm_cbsa", "--model", "cbsa_vit_tiny",
                      "--data-dir", str(tmp_path / "missing")])
    assert rc == 2 and f"--data-dir {tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    assert launch.main(["--dry-run", "--script", str(tmp_path / "nope.py")]) == 2
    assert "--script" in capsys.readouterr().err
    assert launch.main([*base, "--entry", "x:y"]) == 2
    assert "--script and --entry are alternatives" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.rglob("*_submitted.pkl"))


@pytest.mark.timeout(300)
def test_script_runs_in_the_job_process_and_exit_status_is_kept(tmp_path, monkeypatch):
    """--local: the script runs as __main__ with the managed argv; sys.exit(3) fails the job with a traceback."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv("SLURM_CONF", raising=False)
    script = tmp_path / "s.py"
    script.write_text(
        "import json, os, sys\n"
        "import helper_next_to_script\n"  # the script's folder is on sys.path, like `python s.py`
        "if __name__ == '__main__':\n"
        "    a = sys.argv[1:]\n"
        "    out = os.path.join(a[a.index('--output') + 1], a[a.index('--experiment') + 1])\n"
        "    os.makedirs(out, exist_ok=True)\n"
        "    json.dump(dict(argv0=sys.argv[0], argv=a, rank=os.environ['RANK']),\n"
        "              open(os.path.join(out, 'r' + os.environ['RANK'] + '.json'), 'w'))\n"
        "    if '--fail' in a:\n"
        "        sys.exit(3)\n")
    (tmp_path / "helper_next_to_script.py").write_text("")
    common = ["--local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout", "10", "--script", str(script)]
    job = launch.submit(*launch.prepare([*common, "--job-dir", str(tmp_path / "a" / "%j"), "--x", "1"]))
    results = job.results()
    run_dir = Path(str(job.paths.folder)) / "train"
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["run_dir"] == str(run_dir) and r["resumed_from"] is None for r in results)
    import json
    info = json.loads((run_dir / "r1.json").read_text())
    assert info["argv0"] == str(script) and info["argv"][:2] == ["--x", "1"]
    job = launch.submit(*launch.prepare([*common, "--job-dir", str(tmp_path / "b" / "%j"), "--fail"]))
    with pytest.raises(Exception, match="exited with status 3"):
        job.results()


# ---------------------------------------------------------------------------- issue 16.5: full validation first

@pytest.mark.parametrize("flags, names", [
    (["--epochs", "0"], ["--epochs"]),
    (["--batch-size", "-4"], ["--batch-size"]),
    (["--model", "no_such_model_xyz"], ["no_such_model_xyz"]),
    (["--data-dir", "/nonexistent/cbsa-data"], ["/nonexistent/cbsa-data"]),
], ids=["epochs0", "negative-batch", "unknown-model", "missing-data-dir"])
def test_dry_run_refuses_invalid_training_flags(tmp_path, flags, names):
    """`python -m slurm.launch --dry-run` runs the trainer's full validation: non-zero exit, the flag named,
    no sbatch script printed, nothing written."""
    job_dir = tmp_path / "jobs"
    cmd = [sys.executable, "-m", "slurm.launch", "--dry-run", "--gpus-per-node", "0", "--job-dir",
           str(job_dir / "%j"), *TINY, *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                       env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "#SBATCH" not in r.stdout
    for n in names:
        assert n in r.stderr, r.stderr
    assert "nothing was submitted" in r.stderr
    assert not job_dir.exists()


def test_dry_run_valid_flags_pass_and_data_check_can_be_skipped(tmp_path, capsys):
    base = ["--dry-run", "--gpus-per-node", "0", "--job-dir", str(tmp_path / "%j")]
    assert launch.main([*base, *TINY]) == 0
    assert "#SBATCH" in capsys.readouterr().out
    # data only on the compute nodes: --no-data-check skips the folder check, not the others
    assert launch.main([*base, "--no-data-check", *TINY, "--data-dir", "/nonexistent/cbsa-data"]) == 0
    capsys.readouterr()
    assert launch.main([*base, "--no-data-check", *TINY, "--data-dir", "/nonexistent/cbsa-data",
                        "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_exit_after_a_preemption_signal_leaves_no_result(monkeypatch):
    """A trainer that leaves with sys.exit after its signal-time checkpoint (or submitit's exit after the requeue)
    must not produce a result: submitit would report the requeued job as finished."""
    from train import preempt

    def exits(code):
        def fn(argv):
            raise SystemExit(code)
        return fn

    monkeypatch.setattr(preempt, "_RECEIVED", [])
    t = launch.Trainer([], "/tmp/%j")
    with pytest.raises(RuntimeError, match="exited with status 3"):
        t._call(exits(3), [], "x:y")
    assert t._call(exits(0), [], "x:y") is None  # a normal end
    monkeypatch.setattr(preempt, "_RECEIVED", [15])
    with pytest.raises(SystemExit):
        t._call(exits(0), [], "x:y")
    monkeypatch.setattr(preempt, "_RECEIVED", [])
    t.checkpoint()  # what submitit calls on global rank 0 before its sys.exit(-1)
    with pytest.raises(SystemExit):
        t._call(exits(-1), [], "x:y")
    assert pickle.loads(pickle.dumps(t)).leaving() is False  # the requeued run starts afresh


def test_checkpoint_in_a_slurm_job_shields_the_requeue_command_from_sigterm(tmp_path):
    """In a SLURM job, checkpoint() leaves SIGTERM ignored so that the `scontrol requeue` submitit runs next is
    not killed by the SIGTERM the requeue itself makes slurmd send to the job step (a race seen under load)."""
    code = (
        "import os, signal, subprocess, sys\n"
        "from slurm import launch\n"
        "os.environ['SUBMITIT_EXECUTOR'] = 'slurm'\n"
        "launch.Trainer([], '/tmp/%j').checkpoint()\n"
        "r = subprocess.run(['sh', '-c', 'kill -TERM $$; echo survived'], capture_output=True, text=True)\n"
        "print('child', r.returncode, r.stdout.strip())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert "child 0 survived" in r.stdout, (r.stdout, r.stderr)
    # outside a SLURM job (e.g. this test process, --local) nothing changes
    code_local = code.replace("os.environ['SUBMITIT_EXECUTOR'] = 'slurm'\n", "")
    r = subprocess.run([sys.executable, "-c", code_local], capture_output=True, text=True, cwd=REPO_ROOT,
                       env={k: v for k, v in os.environ.items() if k != "SUBMITIT_EXECUTOR"}, timeout=120)
    assert f"child {-15}" in r.stdout, (r.stdout, r.stderr)


@pytest.mark.parametrize("rank, signalled, outcome", [("1", True, SystemExit), ("1", False, RuntimeError),
                                                      ("0", True, RuntimeError)])
def test_rank_failure_after_the_requeue_signal_leaves_no_result(monkeypatch, tmp_path, rank, signalled, outcome):
    """Rank != 0 whose training fails after USR2 (its collective lost rank 0, which left to requeue the job)
    exits without a result (SystemExit); any other failure stays an error result with its traceback."""
    import signal as _signal

    import submitit

    class FakeJobEnv:
        job_id = raw_job_id = "7"
        USR_SIG = "USR2"

    task_rank = int(rank)

    class FakeTorchDistributedEnvironment:
        rank, world_size, local_rank, master_addr, master_port = task_rank, 2, 0, "127.0.0.1", 29500

        def export(self, **kwargs):
            return self

    submitit_handler_calls = []

    def train(argv):
        if signalled:
            os.kill(os.getpid(), _signal.SIGUSR2)
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(submitit, "JobEnvironment", FakeJobEnv)
    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", FakeTorchDistributedEnvironment)
    monkeypatch.setattr(slurm_job, "resolve_entry", lambda entry: train)
    monkeypatch.setenv("RANK", rank)
    old = _signal.signal(_signal.SIGUSR2, lambda s, f: submitit_handler_calls.append(s))  # stands for submitit's
    try:
        with pytest.raises(outcome):
            launch.Trainer([], str(tmp_path / "%j"), entry="x:y")()
    finally:
        _signal.signal(_signal.SIGUSR2, old)
    assert submitit_handler_calls == ([_signal.SIGUSR2] if signalled else [])  # still handed on to submitit
