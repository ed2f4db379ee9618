"""What each source of information is worth: the signals, the demographics (age, sex,
BMI), the physiological features of physio.py (pulse arrival time, heart rate, ...), the
ECGFounder signal conditioning and training-time augmentation, beside the train mean and
ridge regressions, over seeds.

    python benchmarks/bench_covariates.py --out bench_out/covariates --seeds 1 2 3

Makes and prepares one synthetic cohort (``bench_fusion.prepare``, with ``--features``: age,
sex and BMI carry part of the BP, pulse arrival time in the signals another part), then runs
the real ``train_bp.py`` for every setup and seed (the seed also draws the subject split, the
same for every setup) and prints the test MAE per target (mean over seeds) for the setups in
``SETUPS``, the ridge regressions on age/sex/BMI and on those plus PAT and HR (the
``covariate_baseline`` of the two covariate-only runs: the classic physiological baseline)
and the train mean; and, for the model on signals and every covariate, its MAE minus the
ridge's with the 95 % subject-bootstrap interval of the first seed. Prints; asserts nothing.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fusion import TARGETS, get_args_parser as fusion_parser, prepare, train  # noqa: E402
from utils import write_text_atomic  # noqa: E402

DEMOGRAPHICS = ["age", "sex", "bmi"]
PHYSIOLOGY = DEMOGRAPHICS + ["pat_foot_ms", "hr_bpm"]
SETUPS = {
    "signals only": ["--modality", "both"],
    "signals only, --filter ecgfounder": ["--modality", "both", "--filter", "ecgfounder"],
    "signals only, --augment none": ["--modality", "both", "--augment", "none"],
    "age/sex/BMI only": ["--modality", "none", "--covariates", *DEMOGRAPHICS],
    "age/sex/BMI + PAT/HR only": ["--modality", "none", "--covariates", *PHYSIOLOGY],
    "signals + age/sex/BMI": ["--modality", "both", "--covariates", *DEMOGRAPHICS],
    "signals + age/sex/BMI + PAT/HR": ["--modality", "both", "--covariates", *PHYSIOLOGY],
}
RIDGES = {"ridge on age/sex/BMI": "age/sex/BMI only",
          "ridge on age/sex/BMI + PAT/HR": "age/sex/BMI + PAT/HR only"}
BEST = "signals + age/sex/BMI + PAT/HR"


def get_args_parser():
    p = fusion_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(out="bench_out/covariates")
    return p


def rows(results: Dict[str, List[dict]]) -> Dict[str, Dict[str, float]]:
    """Per setup and baseline, the test MAE per target averaged over seeds."""
    table = {name: {t: float(np.mean([r["per_target"][t] for r in runs])) for t in TARGETS}
             for name, runs in results.items()}
    for name, setup in RIDGES.items():
        table[name] = {t: float(np.mean(
            [r["test"]["covariate_baseline"]["per_target"][t]["mae"] for r in results[setup]]))
            for t in TARGETS}
    table["train mean"] = {t: float(np.mean(
        [r["test"]["baseline"]["per_target"][t]["mae"] for r in results[BEST]]))
        for t in TARGETS}
    return table


def report(results: Dict[str, List[dict]], args) -> str:
    table = rows(results)
    base = table["train mean"]
    lines = [f"{len(args.seeds)} seeds, {args.n_subjects} subjects x {args.records_per_subject} "
             f"records, {args.seq_len} samples, --arch {args.arch}, {args.epochs} epochs; "
             f"test MAE in mmHg, mean over seeds (ratio to the train mean)", "",
             "| model | " + " | ".join(TARGETS) + " | mean |", "|" + "---|" * (len(TARGETS) + 2)]
    for name, maes in table.items():
        mean = np.mean(list(maes.values()))
        lines.append(f"| {name} | " + " | ".join(f"{maes[t]:.2f} ({maes[t] / base[t]:.2f})"
                                                 for t in TARGETS)
                     + f" | {mean:.2f} ({mean / np.mean(list(base.values())):.2f}) |")
    both = results[BEST][0]["test"]["covariate_baseline"]["per_target"]
    lines += ["", f"{BEST} minus its ridge, seed {args.seeds[0]}, MAE [95 % CI]: "
              + "; ".join(f"{t} {both[t]['model_mae_diff']:+.2f} "
                          f"[{both[t]['model_mae_diff_ci95'][0]:+.2f}, "
                          f"{both[t]['model_mae_diff_ci95'][1]:+.2f}]" for t in TARGETS)]
    return "\n".join(lines)


def main() -> None:
    args = get_args_parser().parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = prepare(args)
    results: Dict[str, List[dict]] = {name: [] for name in SETUPS}
    for seed in args.seeds:
        for name, flags in SETUPS.items():
            results[name].append(train(args, data, name.replace(" ", "_").replace("+", "and"),
                                       flags, seed))
            print(f"{name} seed {seed}: test MAE {results[name][-1]['mae']:.2f}", flush=True)
    text = report(results, args)
    write_text_atomic(os.path.join(args.out, "covariates_table.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
