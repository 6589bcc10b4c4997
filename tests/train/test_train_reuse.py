"""train.run + train.state serve a trainer other than train.train: a toy regression loop takes the run folder,
writes end-of-epoch and mid-epoch checkpoints through Checkpointer, and a second process resumes where it stopped."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from timm.scheduler import create_scheduler_v2  # noqa: E402

from train.args import parse_args  # noqa: E402
from train.checkpoint import RunFolderError, load_checkpoint_file  # noqa: E402
from train.run import distributed, load_resume_checkpoint, locked_run_folder, run_logging, seed_and_threads  # noqa
from train.state import Checkpointer, TrainState  # noqa: E402

X = torch.linspace(-1, 1, 32).reshape(8, 4, 1)  # 8 batches of 4
Y = 3 * X + 1


def toy_trainer(out, epochs, stop_after=None, resume="auto"):
    """One 'process': trains y = 3x + 1 with SGD; stops after optimizer step ``stop_after`` (a mid-epoch
    checkpoint, as on preemption). Returns (state, what it resumed from)."""
    args = parse_args(["--dataset", "synthetic", "--output", str(out), "--threads", "1", "--quiet",
                       "--resume", resume, "--device", "cpu"])
    with distributed(args) as device, locked_run_folder(args, device) as (coll, out_dir):
        with run_logging(out_dir, args.rank, args.quiet):
            seed_and_threads(args)
            model = nn.Linear(1, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            sched, _ = create_scheduler_v2(opt, sched="step", num_epochs=epochs, decay_epochs=1, decay_rate=0.5)
            state = TrainState(model, opt, sched)
            resumed = load_resume_checkpoint(args.resume, out_dir, args.rank)
            if resumed:
                state.load_weights(resumed[1], resumed[0], arch="toy")
                state.load(resumed[1], resumed[0], arch="toy", batches_per_epoch=len(X), batch_size=4, world=1,
                           rank=0)
            ckpt = Checkpointer(state, coll, out_dir, rank=0, meta={"arch": "toy"}, batch_size=4,
                                eval_metric="loss", max_history=2, resumed=resumed)
            for epoch in range(state.start_epoch, epochs):
                for b in range(state.skip_batches if epoch == state.start_epoch else 0, len(X)):
                    loss = nn.functional.mse_loss(model(X[b]), Y[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    state.global_step += 1
                    if state.global_step == stop_after:
                        ckpt.save(epoch, b + 1, False)
                        return state, resumed
                sched.step(epoch + 1)
                with torch.no_grad():
                    ckpt.save(epoch, len(X), True, {"loss": nn.functional.mse_loss(model(X), Y).item()})
    return state, resumed


def test_a_toy_trainer_checkpoints_and_resumes_exactly(tmp_path):
    ref, _ = toy_trainer(tmp_path / "ref", epochs=3, resume="")
    toy_trainer(tmp_path / "run", epochs=3, stop_after=13, resume="")  # stopped in epoch 1, after its 5th batch
    ck = load_checkpoint_file(str(tmp_path / "run" / "last.pth.tar"))
    assert (ck["epoch"], ck["batches_done"], ck["global_step"], ck["epoch_complete"]) == (1, 5, 13, False)
    assert ck["arch"] == "toy" and len(ck["rng_states"]) == 1
    state, resumed = toy_trainer(tmp_path / "run", epochs=3)
    assert resumed[1]["global_step"] == 13 and not resumed[1]["epoch_complete"]
    assert state.global_step == ref.global_step == 24
    assert torch.equal(state.model.weight, ref.model.weight) and torch.equal(state.model.bias, ref.model.bias)
    assert state.optimizer.param_groups[0]["lr"] == ref.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 8)
    # eval_metric 'loss' ranks lower as better: the two best (= latest, the loss falls) end-of-epoch files are kept
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == \
        ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar"]


def test_the_run_folder_is_taken_once(tmp_path):
    toy_trainer(tmp_path, epochs=1, resume="")
    with pytest.raises(RunFolderError, match="holds a previous run"):
        toy_trainer(tmp_path, epochs=1, resume="")
