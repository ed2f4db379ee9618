"""The whole path on the built-in synthetic cohort, as a user would run it:
make a Kailuan-layout HDF5 -> prepare_kailuan_npz.py -> train_bp.py -> metrics.

    python demo.py --out demo_out          # or: make demo

A re-run into the same --out replaces what the demo wrote there (cohort.h5, npz/, the
labels CSV and the two files prep writes beside it, run/) and keeps every other file; a
non-empty folder that demo.py did not make (it has no .bp_demo marker) is refused.

Each step is printed as the shell command it runs. Prep also computes each record's
physiology (--features: pulse arrival time, heart rate, ...). A small Net1D (--arch small)
reads ECG+PPG and the covariates age, sex, BMI, pulse arrival time and heart rate, and
trains for a minute or two on a 2-core CPU; the real ECGFounder size needs a GPU. The final
table sets the model beside the train-mean predictor and a ridge regression on the same
covariates: the classic physiological baseline (PAT + HR + demographics).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from prepare_kailuan_npz import rejected_path, settings_path
from utils import ArgumentParser, UserError, run_cli

TARGETS = ["right_arm_dbp", "left_arm_mbp", "right_arm_pp", "right_arm_sbp", "left_arm_sbp"]
DEMOGRAPHICS = ["age", "sex", "bmi"]
COVARIATES = DEMOGRAPHICS + ["pat_foot_ms", "hr_bpm"]  # metadata, then physio.py's features
RECORD_SECONDS = 15  # the synthetic cohort's rows span 15 s
MARKER = ".bp_demo"  # marks a folder this script made, so a re-run may replace its outputs


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="folder for the cohort, npz files and the run")
    p.add_argument("--n_subjects", type=int, default=160, help="persons in the synthetic cohort")
    p.add_argument("--records_per_subject", type=int, default=4,
                   help="records (visits) per person")
    p.add_argument("--seq_len", type=int, default=7500,
                   help="samples per record after resampling (7500 as in the seed document)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs")
    p.add_argument("--arch", default="small",
                   help="Net1D size (see train_bp.py --arch); ecgfounder needs a GPU")
    return p


def demo_paths(out: str) -> Dict[str, str]:
    """Where each step writes inside ``--out``."""
    return {name: os.path.join(out, base) for name, base in
            (("h5", "cohort.h5"), ("npz", "npz"), ("labels", "labels.csv"), ("run", "run"))}


def demo_outputs(out: str) -> List[str]:
    """Every entry of ``--out`` that the steps write (prep adds two files beside the CSV)."""
    paths = demo_paths(out)
    return [*paths.values(), rejected_path(paths["labels"]), settings_path(paths["labels"])]


def fresh_folder(out: str) -> None:
    """Create ``out``, or in a folder an earlier demo made remove that demo's outputs and
    keep everything else; a non-empty folder without the marker is refused untouched."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise UserError(f"--out {out} is not empty and was not made by demo.py; choose a new "
                        f"or empty folder")
    for path in demo_outputs(out):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as fh:
        fh.write("made by demo.py: a re-run replaces its outputs here and keeps other files\n")


def step(title: str, argv: List[str]) -> None:
    print(f"\n=== {title}\n$ python {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    result = subprocess.run([sys.executable, *argv])
    if result.returncode != 0:
        raise UserError(f"step '{title}' failed with exit status {result.returncode}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    fresh_folder(args.out)
    h5, npz, labels, run = demo_paths(args.out).values()
    tic = time.perf_counter()
    step("1/3 make a synthetic cohort in the Kailuan layout",
         ["make_synthetic_cohort.py", "--out", h5, "--n_subjects", str(args.n_subjects),
          "--records_per_subject", str(args.records_per_subject), "--seed", "0"])
    step("2/3 prepare: HDF5 -> one npz per record + labels CSV",
         ["prepare_kailuan_npz.py", "--h5_path", h5, "--id_key", "new_id",
          "--target_cols", *TARGETS, "--output_npz", npz, "--output_csv", labels,
          "--target_seq_len", str(args.seq_len), "--extra_cols", *DEMOGRAPHICS,
          "--record_seconds", str(RECORD_SECONDS), "--features", "--workers", "2"])
    step("3/3 train a small Net1D on ECG+PPG, demographics, PAT and HR",
         ["train_bp.py", "--npz_dir", npz, "--labels_csv", labels, "--out_dir", run,
          "--target_cols", *TARGETS, "--modality", "both", "--covariates", *COVARIATES,
          "--arch", args.arch,
          "--epochs", str(args.epochs), "--batch_size", "32", "--lr_backbone", "2e-3",
          "--lr_head", "2e-3", "--num_workers", "1", "--patience", "0"])
    print(f"\ndemo finished in {time.perf_counter() - tic:.0f} s; "
          f"read {os.path.join(run, 'final_metrics.json')} and the prediction CSVs beside it")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
