"""Study: the learned prior variance (``--prior_var auto``) against the fixed default (eta = 1).

For Noisy Adam (``--model FFG``) and Noisy K-FAC (``--model MVG``) on the MNIST MLP, each prior is trained with
``train.py --epoch 3`` (seeds 0 .. S-1, 1 thread) and scored by ``test.py`` (10 weight samples, OOD detection
against FashionMNIST by predictive entropy), through ``runner.run_commands``. The final epoch's ELBO terms and
learned eta per layer come from the run's ``metrics.jsonl``. With ``laplace-torch`` installed, the learned eta is
compared with the prior precision that laplace-torch's marginal likelihood picks (layer-wise, diagonal and K-FAC
GGN, ``optimize_prior_precision`` with ``method="marglik"``) around the auto Noisy Adam run's means, as a sanity
check of its scale.

    python bench/prior_study.py --data_root ../shared/data --seeds 1
    python bench/prior_study.py --report_only
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from runner import Store, Study, command, commands_parser, md_table, run_commands  # noqa: E402

EPOCHS = 3
OUT = RESULTS / "prior_study.json"
#: name -> train.py flags
CONFIGS = {
    "noisy_adam/fixed": ["--model=FFG"],
    "noisy_adam/auto": ["--model=FFG", "--prior_var=auto"],
    "noisy_kfac/fixed": ["--model=MVG"],
    "noisy_kfac/auto": ["--model=MVG", "--prior_var=auto"],
}
COLUMNS = ("test_acc", "test_nll", "test_ece", "ood_auroc")
TEST_FLAGS = ("--test_samples=10", "--ood_dataset=FashionMNIST")


def run(name: str, seed: int, ckpt_dir: Path, data_root: str | None, threads: int) -> tuple[dict, Path]:
    """One configuration through train.py and test.py: test.py's scores, the last epoch's ELBO terms and learned
    eta, the command; and the last checkpoint."""
    flags = [*CONFIGS[name], f"--seed={seed}"]
    done = run_commands(name.replace("/", "_") + f"_s{seed}", flags, EPOCHS, ckpt_dir, data_root, threads,
                        TEST_FLAGS, quiet=True)
    result = {k: v for k, v in done.test.items() if k in COLUMNS}
    last = done.epochs[-1]
    result.update({k: last[k] for k in ("elbo", "expected_loglik", "kl") if k in last})
    if "prior_var" in last:
        result["prior_var"] = last["prior_var"]
    result["command"] = " ".join(["python train.py", *CONFIGS[name], f"--epoch={EPOCHS}", f"--seed={seed}"]) + \
        " && python test.py " + " ".join(TEST_FLAGS)
    return result, done.checkpoint


def laplace_prior(checkpoint: str, data_root: str | None, examples: int) -> dict:
    """laplace-torch's layer-wise marginal-likelihood prior variance (1 / precision) around a run's means."""
    import torch
    from laplace import Laplace
    from torch import nn

    from data import load_split

    torch.manual_seed(0)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
    net[1].weight.data, net[1].bias.data = state["fc1.weight"], state["fc1.bias"]
    net[3].weight.data, net[3].bias.data = state["fc2.weight"], state["fc2.bias"]
    x, y = load_split("MNIST", True, data_root, torch.device("cpu"))
    x, y = x[:examples], y[:examples]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=250)
    out = {}
    for structure in ("diag", "kron"):
        la = Laplace(net, "classification", subset_of_weights="all", hessian_structure=structure)
        la.fit(loader)
        # fit() sums the log-likelihood over the examples seen: with all 60,000, the ELBO's N
        la.optimize_prior_precision(method="marglik", pred_type="glm", prior_structure="layerwise", n_steps=200,
                                    lr=0.1, init_prior_prec=1.0)
        prec = la.prior_precision.detach().double().tolist()  # one per parameter tensor: w1, b1, w2, b2
        out[structure] = {"fc1.weight": 1 / prec[0], "fc1.bias": 1 / prec[1], "fc2.weight": 1 / prec[2],
                          "fc2.bias": 1 / prec[3]}
    out["examples"] = examples
    return out


def report(results: Store) -> None:
    rows = []
    for key, r in sorted(results.runs.items()):
        name, seed = key.rsplit("/s", 1)
        eta = ", ".join(f"{v:.3g}" for v in r.get("prior_var", {}).values()) or "1 (fixed)"
        rows.append([name, seed, f"{100 * r['test_acc']:.2f}%", f"{r['test_nll']:.4f}", f"{r['test_ece']:.4f}",
                     f"{r['ood_auroc']:.4f}", f"{r['elbo']:.4g}", f"{r['expected_loglik']:.4g}", f"{r['kl']:.4g}", eta])
    print("\n" + "\n".join(md_table(["run", "seed", "test acc", "NLL", "ECE", "OOD AUROC", "ELBO", "E log-lik", "KL",
                                     "learned eta (fc1, fc2)"], rows)))
    la = results.get("laplace")
    if la and "error" in la:
        print(f"\n{la['error']}")
    elif la:
        print(f"\nlaplace-torch marginal-likelihood prior variance (1/precision) at the auto Noisy Adam means, "
              f"{la['examples']} training examples:")
        for structure in ("diag", "kron"):
            print(f"  {structure}: " + ", ".join(f"{k} {v:.3g}" for k, v in la[structure].items()))


def main() -> None:
    parser = commands_parser(__doc__, CONFIGS, seeds=1)
    parser.add_argument("--laplace_examples", type=int, default=60000)
    args = parser.parse_args()
    results = Store(OUT)
    if not args.report_only:
        results["command"] = command("prior_study.py", sys.argv[1:])
        with tempfile.TemporaryDirectory() as tmp:
            def one(task: None, name: str, seed: int) -> dict:
                result, checkpoint = run(name, seed, Path(tmp), args.data_root, args.num_threads)
                if name == "noisy_adam/auto" and seed == 0:
                    try:
                        results["laplace"] = laplace_prior(str(checkpoint), args.data_root, args.laplace_examples)
                    except ImportError as e:
                        results["laplace"] = {"error": f"laplace-torch not available: {e}"}
                return result

            Study([None], args.only, range(args.seeds)).run(
                results, lambda task, name, seed: f"{name}/s{seed}", one, done=lambda *_: False)
    report(results)


if __name__ == "__main__":
    main()
