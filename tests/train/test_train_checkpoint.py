"""train.checkpoint.Saver: timm's checkpoint layout and ranking, written atomically; the ranking survives a resume."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.checkpoint import Saver, find_resume_checkpoint, load_checkpoint_file  # noqa: E402


def _state(epoch):
    return {"state_dict": {"w": torch.full((2,), float(epoch))}, "global_step": 10 * (epoch + 1)}


def _kept(folder):
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in Path(folder).glob("checkpoint-*.pth.tar"))


def _top(metrics, k, decreasing=False):
    """The k best epochs, ties to the earlier epoch (the straightforward definition)."""
    order = sorted(range(len(metrics)), key=lambda e: ((metrics[e] if decreasing else -metrics[e]), e))
    return sorted(order[:k])


@pytest.mark.parametrize("decreasing", [False, True])
def test_keeps_the_best_epochs_and_links_best_and_last(tmp_path, decreasing):
    metrics = [5.0, 9.0, 7.0, 9.0, 1.0, 7.0, 3.0]
    saver = Saver(str(tmp_path), decreasing=decreasing, max_history=3)
    for epoch, m in enumerate(metrics):
        saver.save_checkpoint(_state(epoch), epoch, m)
        assert _kept(tmp_path) == _top(metrics[:epoch + 1], 3, decreasing)
    best = _top(metrics, 1, decreasing)[0]
    assert (saver.best_epoch, saver.best_metric) == (best, metrics[best])
    assert load_checkpoint_file(str(tmp_path / "model_best.pth.tar"))["state_dict"]["w"][0] == best
    assert load_checkpoint_file(str(tmp_path / "last.pth.tar"))["global_step"] == 10 * len(metrics)
    for e in _kept(tmp_path):  # each kept file is the checkpoint of its epoch
        assert load_checkpoint_file(str(tmp_path / f"checkpoint-{e}.pth.tar"))["state_dict"]["w"][0] == e
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_checkpoints_without_a_metric_keep_the_newest_and_never_displace_ranked_ones(tmp_path):
    saver = Saver(str(tmp_path), max_history=2)
    for epoch in range(4):
        saver.save_checkpoint(_state(epoch), epoch, None)
    assert _kept(tmp_path) == [2, 3] and saver.best_epoch is None and not (tmp_path / "model_best.pth.tar").exists()
    saver.save_checkpoint(_state(4), 4, 1.0)  # a ranked one displaces an unranked one
    saver.save_checkpoint(_state(5), 5, None)  # replaces the older unranked one
    assert _kept(tmp_path) == [4, 5]
    saver.save_checkpoint(_state(6), 6, 0.5)  # worse than 4, but the history's worst is unranked
    assert _kept(tmp_path) == [4, 6]
    saver.save_checkpoint(_state(7), 7, None)  # both ranked: an unranked one is not kept
    assert _kept(tmp_path) == [4, 6] and saver.best_epoch == 4


def test_ranking_continues_after_a_resume(tmp_path):
    metrics = [4.0, 8.0, 6.0, 2.0, 7.0, 9.0]
    a = Saver(str(tmp_path), max_history=3)
    for epoch, m in enumerate(metrics[:3]):
        a.save_checkpoint(_state(epoch), epoch, m)
    path, ck = find_resume_checkpoint(str(tmp_path))
    b = Saver(str(tmp_path), max_history=3)  # a new process: the ranking comes from the checkpoint
    b.load_state_dict(ck["saver"])
    assert (b.best_epoch, b.best_metric) == (1, 8.0)
    for epoch, m in enumerate(metrics[3:], start=3):
        b.save_checkpoint(_state(epoch), epoch, m)
    assert _kept(tmp_path) == _top(metrics, 3) and b.best_epoch == 5


def test_recovery_files_keep_two_and_last_points_at_the_newest(tmp_path):
    saver = Saver(str(tmp_path), max_history=3)
    for batch in (3, 6, 9):
        saver.save_recovery(_state(0), 0, batch)
        assert os.path.samefile(tmp_path / f"recovery-0-{batch}.pth.tar", tmp_path / "last.pth.tar")
    assert sorted(p.name for p in tmp_path.glob("recovery-*")) == ["recovery-0-6.pth.tar", "recovery-0-9.pth.tar"]
    saver.save_checkpoint(_state(0), 0, 1.0)
    saver.remove_recovery()
    assert not list(tmp_path.glob("recovery-*")) and _kept(tmp_path) == [0]
    assert os.path.samefile(tmp_path / "checkpoint-0.pth.tar", tmp_path / "last.pth.tar")
