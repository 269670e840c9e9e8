"""Evaluate a trained run: accuracy, log loss and calibration of the MC predictive.

    python test.py --epoch=20                      # the most recently trained run
    python test.py --model=MVG --epoch=20          # the latest MVG run
    python test.py --name=MNIST_FFG_noisy_adam_mlp --test_samples=100 --ood_dataset=FashionMNIST
    python test.py --epoch=20 --rotate=60          # the test set rotated by 60 degrees (dataset shift)

The model is rebuilt from the options saved with the run; only evaluation flags are needed.
Prints a table and one JSON line (``{"name": ..., "test_acc": ...}``) for scripts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from data import load_split
from evaluation import evaluate, ood_auroc, predict
from experiment import make_model
from option_parser import TestOptions
from util.errors import UserError, run_cli
from util.run_dir import RunDir


def main(argv: list[str] | None = None) -> None:
    opt = TestOptions().parse(argv)
    if opt.num_threads:
        torch.set_num_threads(opt.num_threads)
    device = torch.device(opt.device)
    run = RunDir(opt.run_dir)
    path = run.checkpoint(opt.epoch)
    ckpt = run.load_checkpoint(opt.epoch)
    model = make_model(opt).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not match a {opt.model} {opt.arch} for {opt.dataset} "
                        f"({str(e).splitlines()[0][:120]}); was it written by another run?") from None

    test_x, test_y = load_split(opt.dataset, False, opt.data_root, device, rotate_degrees=opt.rotate)
    # the networks of train.py's evaluation of this epoch when --seed is the run's
    metrics, probs = evaluate(model, test_x, test_y, opt.test_samples, opt.seed, opt.epoch, opt.eval_batch_size)
    result = {"name": opt.name, "epoch": opt.epoch, "model": opt.model, "optimizer": opt.optimizer,
              "arch": opt.arch, "dataset": opt.dataset, "rotate": opt.rotate, "test_samples": opt.test_samples,
              "test_acc": metrics["acc"], "test_nll": metrics["nll"], "test_ece": metrics["ece"]}
    if opt.ood_dataset:
        # through the training set's preprocessing, as a deployed model sees any input
        ood_x, _ = load_split(opt.ood_dataset, False, opt.data_root, device, normalize_as=opt.dataset)
        result["ood_dataset"] = opt.ood_dataset
        ood_probs = predict(model, ood_x, opt.test_samples, opt.seed, opt.epoch, opt.eval_batch_size)
        result["ood_auroc"] = ood_auroc(probs, ood_probs)

    samples = f"{opt.test_samples} weight samples" if opt.test_samples else "mean weights"
    shift = f", test images rotated {opt.rotate:g} degrees" if opt.rotate else ""
    print(f"{opt.name} epoch {opt.epoch} ({Path(path)}), predictive over {samples}{shift}:")
    print(f"  test accuracy  {100 * result['test_acc']:.2f}%")
    print(f"  test log loss  {result['test_nll']:.4f}")
    print(f"  test ECE       {result['test_ece']:.4f}")
    if opt.ood_dataset:
        print(f"  OOD AUROC      {result['ood_auroc']:.4f}  (predictive entropy, {opt.dataset} vs {opt.ood_dataset})")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(run_cli(main))
