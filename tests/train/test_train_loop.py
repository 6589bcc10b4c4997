"""train.train: end-to-end tiny runs, config files, errors, NaN handling, ImageFolder."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint_file  # noqa: E402
from train.train import (  # noqa: E402
    ConfigError, ModelNotFoundError, NonFiniteLossError, build_parser, main, parse_args, validate_args,
)
from timm_cbsa.data import DatasetNotFoundError  # noqa: E402

TINY = ["--dataset", "synthetic", "--img-size", "16", "--num-classes", "4",
        "--model", "cbsa_vit_tiny", "--model-kwargs", "patch_size=4", "rep_grid=2", "embed_dim=32", "depth=1",
        "num_heads=2", "--batch-size", "16", "--max-train-samples", "128", "--max-val-samples", "64",
        "--opt", "adamw", "--lr", "3e-3", "--sched", "cosine", "--workers", "0", "--seed", "1",
        "--color-jitter", "0", "--scale", "0.9", "1.0", "--hflip", "0", "--threads", "1", "--quiet"]


def test_parser_and_config(tmp_path):
    p = build_parser()
    assert p.parse_args([]).dataset == "fashion_mnist"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: cbt_tiny\nlr: 0.0002\nmodel-kwargs: {rep_grid: 4}\nopt: lion\n")
    a = parse_args(["--config", str(cfg), "--lr", "0.1"])
    assert (a.model, a.lr, a.opt, a.model_kwargs) == ("cbt_tiny", 0.1, "lion", {"rep_grid": 4})
    cfg.write_text("not_a_flag: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'not_a_flag'"):
        parse_args(["--config", str(cfg)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def _classification_recipes():
    """Every recipe except the segmentation ones (a ``decoder`` key: train.segment's, tests/train/test_segment.py)."""
    import yaml
    return [p for p in sorted((ROOT / "train" / "configs").glob("*.yaml"))
            if "decoder" not in (yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("cfg", _classification_recipes(), ids=lambda p: p.name)
def test_recipe_files_parse(cfg):
    a = parse_args(["--config", str(cfg)])
    assert a.model and a.epochs > 0 and (a.lr or a.lr_base) > 0
    validate_args(a, check_paths=False)


def test_tiny_run_learns_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    long = ["--epochs", "5", "--lr", "1e-2", "--max-train-samples", "256", "--output", str(out), "--model-ema",
            "--model-ema-decay", "0.9"]
    res = main(TINY + long)
    assert res["top1"] > 50.0, res  # 4 classes -> chance is 25%
    assert res["step"] == 5 * (256 // 16) and res["epoch"] == 4
    rows = (out / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 6 and rows[0].startswith("epoch,train_loss")
    assert "eval_ema_top1" in rows[0]
    for f in ("last.pth.tar", "model_best.pth.tar", "checkpoint-4.pth.tar", "args.yaml", "log.txt"):
        assert (out / f).exists(), f
    ck = load_checkpoint_file(str(out / "last.pth.tar"))
    assert ck["global_step"] == res["step"] and ck["epoch_complete"] and "state_dict_ema" in ck
    # timm's own helpers can read our checkpoints
    import timm
    from timm.models import load_checkpoint
    m = timm.create_model("cbsa_vit_tiny", img_size=16, in_chans=1, num_classes=4, patch_size=4, rep_grid=2,
                          embed_dim=32, depth=1, num_heads=2)
    load_checkpoint(m, str(out / "last.pth.tar"))
    # resuming a finished run does nothing but evaluate; the step count is kept
    res2 = main(TINY + long + ["--resume", "auto"])
    assert res2["step"] == res["step"] and abs(res2["top1"] - res["top1"]) < 1e-6


def test_max_steps_and_experiment_subdir(tmp_path):
    res = main(TINY + ["--epochs", "5", "--max-steps", "5", "--output", str(tmp_path), "--experiment", "e1"])
    assert res["step"] == 5 and res["epoch"] == 0
    path, ck = find_resume_checkpoint(str(tmp_path / "e1"))
    # mid-epoch: timm's recovery checkpoint, and last.pth.tar is the same file (hard link)
    assert os.path.samefile(tmp_path / "e1" / "recovery-0-5.pth.tar", tmp_path / "e1" / "last.pth.tar")
    assert ck["global_step"] == 5 and not ck["epoch_complete"] and ck["batches_done"] == 5
    # continue with a larger budget: the global step continues from 5
    res = main(TINY + ["--epochs", "5", "--max-steps", "12", "--output", str(tmp_path), "--experiment", "e1",
                       "--auto-resume"])
    assert res["step"] == 12 and res["epoch"] == 1


def test_grad_accumulation_counts_updates(tmp_path):
    res = main(TINY + ["--epochs", "1", "--grad-accum-steps", "3", "--output", str(tmp_path)])
    assert res["step"] == 3  # 8 batches -> updates after 3, 6 and the last batch


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss .* optimizer step 6.*last good checkpoint"):
        main(TINY + ["--epochs", "3", "--output", str(tmp_path), "--checkpoint-interval-steps", "2",
                     "--debug-nan-at-step", "6"])
    ck = find_resume_checkpoint(str(tmp_path))[1]
    assert ck["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_injected_step_hooks_see_every_micro_batch_and_step(tmp_path):
    from train.hooks import StepHooks

    class Record(StepHooks):
        def __init__(self):
            self.loss_steps, self.steps = [], []

        def on_loss(self, step, loss):
            self.loss_steps.append(step)
            return loss

        def after_step(self, step):
            self.steps.append(step)
    rec = Record()
    res = main(TINY + ["--epochs", "1", "--grad-accum-steps", "3", "--output", str(tmp_path)], hooks=rec)
    # 8 micro-batches; optimizer steps after batches 3, 6 and the last: batch i belongs to step min(ceil(i/3), 3)
    assert rec.loss_steps == [min((i + 2) // 3, 3) for i in range(1, 9)]
    assert rec.steps == list(range(1, res["step"] + 1)) == [1, 2, 3]


def test_the_loop_has_no_test_branches():
    """Fault injection lives in train/hooks.py (built from the hidden --debug-* flags); the loop only calls hooks."""
    import ast
    for name in ("train.py", "run.py", "state.py", "checkpoint.py"):
        tree = ast.parse((ROOT / "train" / name).read_text())
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not [a for a in used if a.startswith("debug_")], name


def test_unknown_model_is_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="Unknown model 'cbsa_vit_gigantic'"):
        main(["--model", "cbsa_vit_gigantic", "--dataset", "synthetic", "--output", str(tmp_path)])


def test_missing_and_malformed_data_dir(tmp_path):
    base = ["--model", "cbsa_vit_tiny", "--output", str(tmp_path / "o")]
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        main(base + ["--dataset", "", "--data-dir", str(tmp_path / "nope")])
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="train/cat' has no image files"):
        main(base + ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "d")])
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        main(base + ["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "empty")])


def test_incompatible_or_corrupt_checkpoint(tmp_path):
    main(TINY + ["--epochs", "1", "--output", str(tmp_path / "a")])
    other = [a if a != "embed_dim=32" else "embed_dim=48" for a in TINY]
    with pytest.raises(CheckpointError, match=r"built differently.*--model-kwargs embed_dim=32 \(this run: embed_dim=48\)"):
        main(other + ["--epochs", "2", "--output", str(tmp_path / "b"),
                      "--resume", str(tmp_path / "a" / "last.pth.tar")])
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        main(TINY + ["--output", str(tmp_path / "c"), "--resume", str(bad)])
    with pytest.raises(CheckpointError, match="does not exist"):
        main(TINY + ["--output", str(tmp_path / "c"), "--initial-checkpoint", str(tmp_path / "none.pth")])


def test_imagefolder_tree_trains(tmp_path):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c, v in (("dark", 40), ("light", 210)):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.clip(rng.normal(v, 20, (20, 20, 3)), 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    res = main(["--dataset", "imagefolder", "--data-dir", str(tmp_path), "--img-size", "16",
                "--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=1",
                "num_heads=2", "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--output",
                str(tmp_path / "out"), "--quiet", "--threads", "1"])
    assert res["step"] == 6 and 0.0 <= res["top1"] <= 100.0
    ck = load_checkpoint_file(str(tmp_path / "out" / "last.pth.tar"))
    assert ck["state_dict"]["head.weight"].shape[0] == 2  # num_classes inferred from the folder


def test_vit_adaptation_from_local_pretrained_file(tmp_path):
    import timm
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=1000, in_chans=1, **kw)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    res = main(["--dataset", "synthetic", "--img-size", "16", "--num-classes", "4", "--model", "vit_tiny_patch16_224",
                "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=1", "num_heads=2",
                "--pretrained", "--pretrained-path", str(tmp_path / "vit.pth"), "--convert", "cbsa_star",
                "--convert-rep-grid", "2", "--batch-size", "16", "--max-train-samples", "64", "--max-val-samples",
                "32", "--epochs", "1", "--opt", "adamw", "--lr", "5e-5", "--weight-decay", "0.01",
                "--output", str(tmp_path / "o"), "--quiet", "--threads", "1"])
    assert res["step"] == 4
    sd = load_checkpoint_file(str(tmp_path / "o" / "last.pth.tar"))["state_dict"]
    # pretrained patch embedding kept (fine-tuned a little), the attention is CBSA* now (new step-size params)
    assert torch.allclose(sd["patch_embed.proj.weight"], src.state_dict()["patch_embed.proj.weight"], atol=1e-2)
    assert set(sd) != set(src.state_dict())


def test_progress_line_with_eta_and_linear_baseline(tmp_path, caplog, capsys):
    import logging
    caplog.set_level(logging.INFO, logger="train")
    args = [a for a in TINY if a != "--quiet"]
    res = main(args + ["--epochs", "2", "--log-interval", "2", "--output", str(tmp_path), "--linear-baseline"])
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Train ")]
    # 128 samples / 16 = 8 steps an epoch, 16 in all; a line every 2 steps, mid-epoch only (the 8th is the epoch line)
    assert [m.split(" | ")[0] for m in progress][:3] == ["Train 0 [2/8] step 2 of 16 (12%)",
                                                         "Train 0 [4/8] step 4 of 16 (25%)",
                                                         "Train 0 [6/8] step 6 of 16 (38%)"]
    assert all(" | ETA " in m and "img/s" in m for m in progress)
    assert 0.0 <= res["linear_baseline_top1"] <= 100.0
    out = capsys.readouterr().out
    assert f"model {res['top1']:.2f}% vs linear baseline {res['linear_baseline_top1']:.2f}% on raw pixels" in out
    import json
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["linear_baseline_top1"] == res["linear_baseline_top1"] and saved["top1"] == res["top1"]
    with pytest.raises(ConfigError, match="--linear-baseline needs an in-memory dataset"):
        validate_args(parse_args(["--dataset", "imagefolder", "--linear-baseline"]), check_paths=False)


def test_linear_baseline_separable_and_random_labels():
    import numpy as np
    from train.train import linear_baseline
    rng = np.random.default_rng(0)

    class InMemory:  # what the adapters expose: .images (N, H, W) uint8, .targets (N,)
        def __init__(self, n, random_labels=False):
            self.targets = rng.integers(0, 4, n)
            self.images = rng.integers(0, 40, (n, 8, 8)).astype(np.uint8)
            for i, c in enumerate(self.targets):
                self.images[i, 2 * c:2 * c + 2] += 200  # class c lights up rows 2c, 2c+1
            if random_labels:
                self.targets = rng.integers(0, 4, n)

        def __len__(self):
            return len(self.targets)

    assert linear_baseline(InMemory(400), InMemory(200), 4) == 100.0  # linearly separable
    assert linear_baseline(InMemory(400, True), InMemory(400, True), 4) < 40.0  # labels unrelated: about chance


def test_cluster_flags_train(tmp_path):
    """--grad-checkpointing, --bce-loss, --aug-repeats, --channels-last, --lr-base in one tiny run."""
    args = [a for a in TINY if a not in ("--lr", "3e-3")]
    res = main(args + ["--epochs", "1", "--output", str(tmp_path), "--grad-checkpointing", "--bce-loss",
                       "--aug-repeats", "2", "--channels-last", "--lr-base", "1e-3", "--lr-base-size", "32",
                       "--lr-base-scale", "linear"])
    assert res["step"] == 128 // 16
    ck = load_checkpoint_file(str(tmp_path / "last.pth.tar"))
    assert ck["args"]["lr"] == pytest.approx(1e-3 * 16 / 32)  # global batch 16 = half of --lr-base-size
    assert ck["args"]["grad_checkpointing"] and ck["args"]["bce_loss"]
