"""Label efficiency of self-supervised pre-training, and the objectives on real waveforms.

    python benchmarks/bench_ssl.py --out bench_out/ssl                     # CPU, small arch
    python benchmarks/bench_ssl.py --out bench_out/ssl --arch ecgfounder   # the GPU run

Synthetic part: one cohort (``make_synthetic_cohort.py``), prepared once, split by subject
into a fixed test set, a labelled pool and an unlabelled pool. ``pretrain_ssl.py`` pre-trains
on the unlabelled pool only (the other two pools are its ``--exclude``), once with all the
objectives the fusion allows and once per objective alone. Then ``train_bp.py`` fine-tunes
on the first N subjects of the labelled pool (N in ``--label_counts``; its own split takes
``--val_ratio`` of them for validation and one subject as its test, unused), from the SSL
encoders and from a random start with the same settings, per seed; ``predict_bp.py`` scores
every model on the fixed test set. Table: test MAE (mean of targets; mean +/- SD over seeds)
per N, the ratio SSL / scratch, and each objective alone.

BIDMC part (``--bidmc DIR``, real ICU ECG + PPG without BP): ``make_cohort_h5.py wfdb``
windows the records, prep resamples them, ``pretrain_ssl.py`` holds out ``--bidmc_heldout``
of the records (one subject per record) and reports, on those, the pretext accuracies and
the cross-modal retrieval top-1 (a window's PPG found from its ECG among all held-out
windows; chance 1/N) before and after pre-training. Prints and writes ``ssl_table.md``;
asserts nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import NPZ_MANIFEST, ArgumentParser, subject_of, write_text_atomic  # noqa: E402

TARGETS = ["right_arm_sbp", "right_arm_dbp"]


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/ssl", help="folder for everything (reused)")
    p.add_argument("--n_subjects", type=int, default=1500,
                   help="subjects of the synthetic cohort (unlabelled pool, labelled pool, test)")
    p.add_argument("--records_per_subject", type=int, default=4, help="records per subject")
    p.add_argument("--n_test", type=int, default=300, help="subjects of the fixed test set")
    p.add_argument("--n_labelled", type=int, default=400, help="subjects of the labelled pool")
    p.add_argument("--seq_len", type=int, default=1500, help="samples per 15 s record")
    p.add_argument("--arch", default="small", help="Net1D size of every encoder (as train_bp.py)")
    p.add_argument("--fusion", default="early",
                   help="of pre-training and fine-tuning (early: contrastive + timing; "
                        "late/mid: cross-modal too)")
    p.add_argument("--label_counts", type=int, nargs="+", default=[25, 50, 100, 400],
                   help="labelled subjects of each fine-tune (drawn from the labelled pool)")
    p.add_argument("--alone_counts", type=int, nargs="+", default=[25, 50],
                   help="label counts at which each objective alone is fine-tuned too")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="seeds of pre-training and fine-tuning; the table gives mean and SD")
    p.add_argument("--ssl_epochs", type=int, default=30, help="pre-training epochs")
    p.add_argument("--ft_epochs", type=int, default=30, help="fine-tuning epochs")
    p.add_argument("--ssl_batch", type=int, default=128, help="pre-training batch size")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads of every run (0: torch's default)")
    p.add_argument("--bidmc", default=None, help="folder of the BIDMC WFDB records")
    p.add_argument("--bidmc_seq_len", type=int, default=1250, help="samples per 10 s window")
    p.add_argument("--bidmc_epochs", type=int, default=20, help="pre-training epochs on BIDMC")
    p.add_argument("--bidmc_heldout", type=float, default=0.25,
                   help="share of BIDMC records held out from pre-training and scored")
    p.add_argument("--skip_synthetic", action="store_true",
                   help="run only the BIDMC check (with --bidmc)")
    return p


def run(argv: List[str]) -> None:
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def threads(args) -> List[str]:
    return ["--threads", str(args.threads)] if args.threads else []


# ----------------------------------------------------------------------------- synthetic
def prepare(args) -> dict:
    """The cohort, prepared once; the three pools of subjects and their labels CSVs."""
    h5, npz = os.path.join(args.out, "cohort.h5"), os.path.join(args.out, "npz")
    labels = os.path.join(args.out, "labels.csv")
    if not os.path.isfile(labels):
        run(["make_synthetic_cohort.py", "--out", h5, "--n_subjects", str(args.n_subjects),
             "--records_per_subject", str(args.records_per_subject), "--seed", "0",
             "--overwrite"])
        run(["prepare_kailuan_npz.py", "--h5_path", h5, "--target_cols", *TARGETS,
             "--output_npz", npz, "--output_csv", labels, "--target_seq_len",
             str(args.seq_len), "--workers", "2", "--record_seconds", "15"])
    table = pd.read_csv(labels, dtype={"ssoid": str})
    table["subject_id"] = table["ssoid"].map(subject_of)
    subjects = sorted(set(table["subject_id"]))
    order = [subjects[i] for i in np.random.default_rng(0).permutation(len(subjects))]
    pools = {"test": order[:args.n_test],
             "labelled": order[args.n_test:args.n_test + args.n_labelled],
             "unlabelled": order[args.n_test + args.n_labelled:]}
    pd.DataFrame({"subject_id": pools["test"] + pools["labelled"]}).to_csv(
        os.path.join(args.out, "exclude.csv"), index=False)
    test_npz = os.path.join(args.out, "npz_test")
    if not os.path.isdir(test_npz):  # the test records alone, for predict_bp.py
        os.makedirs(test_npz)
        shutil.copy(os.path.join(npz, NPZ_MANIFEST), test_npz)
        for s in table.loc[table["subject_id"].isin(pools["test"]), "ssoid"]:
            os.symlink(os.path.abspath(os.path.join(npz, f"{s}.npz")),
                       os.path.join(test_npz, f"{s}.npz"))
    test_labels = os.path.join(args.out, "labels_test.csv")
    table[table["subject_id"].isin(pools["test"])].to_csv(test_labels, index=False)
    return {"npz": npz, "labels": labels, "table": table, "pools": pools,
            "test_npz": test_npz, "test_labels": test_labels}


def objective_sets(fusion: str) -> Dict[str, List[str]]:
    every = ["contrastive", "timing"] + (["crossmodal"] if fusion != "early" else [])
    return {"all": every, **{o: [o] for o in every}}


def pretrain(args, data: dict, name: str, objectives: Sequence[str]) -> dict:
    out = os.path.join(args.out, f"ssl_{name}")
    tic = time.perf_counter()
    if not os.path.isfile(os.path.join(out, "ssl_encoders.pth")):
        run(["pretrain_ssl.py", "--npz_dir", data["npz"], "--out_dir", out, "--overwrite",
             "--exclude", os.path.join(args.out, "exclude.csv"), "--arch", args.arch,
             "--modality", "both", "--fusion", args.fusion, "--objectives", *objectives,
             "--epochs", str(args.ssl_epochs), "--batch_size", str(args.ssl_batch),
             "--num_workers", "0", "--cache_dir", os.path.join(args.out, "cache"),
             "--val_ratio", "0.05", "--monitor_every", str(max(1, args.ssl_epochs // 3)),
             *threads(args)])
    history = pd.read_csv(os.path.join(out, "ssl_history.csv"))
    return {"path": os.path.join(out, "ssl_encoders.pth"), "history": history,
            "seconds": time.perf_counter() - tic}


def finetune(args, data: dict, n: int, seed: int, start: str, encoders) -> float:
    """Test MAE (mean of targets) of one fine-tune on n labelled subjects."""
    out = os.path.join(args.out, f"ft_{start}_n{n}_seed{seed}")
    metrics_path = os.path.join(out, "test_fixed_metrics.json")
    if not os.path.isfile(metrics_path):
        chosen = data["pools"]["labelled"][:n]
        labels = os.path.join(args.out, f"labels_n{n}.csv")
        data["table"][data["table"]["subject_id"].isin(chosen)].to_csv(labels, index=False)
        run(["train_bp.py", "--npz_dir", data["npz"], "--labels_csv", labels, "--out_dir", out,
             "--overwrite", "--target_cols", *TARGETS, "--arch", args.arch, "--modality",
             "both", "--fusion", args.fusion, "--epochs", str(args.ft_epochs), "--batch_size",
             "32", "--lr_backbone", "2e-3", "--lr_head", "2e-3", "--num_workers", "0",
             "--patience", "0", "--seed", str(seed), "--val_ratio", "0.2", "--test_ratio",
             "0.01", "--interval", "0", "--filter", "none", "--cache_dir",
             os.path.join(args.out, "cache"), *threads(args),
             *(["--pretrain", encoders] if encoders else [])])
        run(["predict_bp.py", "--checkpoint", os.path.join(out, "bp_best.pth"), "--npz_dir",
             data["test_npz"], "--labels_csv", data["test_labels"], "--output",
             os.path.join(out, "test_fixed.csv"), "--device", "cpu", "--overwrite"])
    with open(metrics_path) as fh:
        report = json.load(fh)
    return float(report["new"]["mean"]["mae"])  # the test subjects are new to the run


def synthetic(args) -> str:
    data = prepare(args)
    sets = objective_sets(args.fusion)
    ssl = {name: pretrain(args, data, name, objs) for name, objs in sets.items()
           if name == "all" or set(args.alone_counts) & set(args.label_counts)}
    for name, s in ssl.items():
        last = s["history"].iloc[-1]
        print(f"pre-trained {name}: {s['seconds']:.0f} s, " + ", ".join(
            f"held-out acc {k} {last[f'heldout_acc_{k}']:.3f}" for k in sets[name]), flush=True)
    results: Dict[str, Dict[int, List[float]]] = {}
    for n in args.label_counts:
        starts = ["scratch", "all"] + ([o for o in sets if o != "all"]
                                       if n in args.alone_counts else [])
        for seed in args.seeds:
            for start in starts:
                mae = finetune(args, data, n, seed, start,
                               None if start == "scratch" else ssl[start]["path"])
                results.setdefault(start, {}).setdefault(n, []).append(mae)
                print(f"n {n} seed {seed} {start}: test MAE {mae:.2f}", flush=True)
    return synthetic_table(args, results, ssl, data)


def _cell(values: Sequence[float]) -> str:
    v = np.asarray(values)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}"


def synthetic_table(args, results, ssl, data) -> str:
    test = data["table"][data["table"]["subject_id"].isin(data["pools"]["test"])]
    lines = [f"{args.n_subjects} subjects x {args.records_per_subject} records "
             f"({len(data['pools']['unlabelled'])} unlabelled subjects pre-train, "
             f"{args.n_test} test), {args.seq_len} samples / 15 s, --arch {args.arch}, "
             f"--fusion {args.fusion}, {args.ssl_epochs} SSL epochs, {args.ft_epochs} "
             f"fine-tune epochs, seeds {' '.join(map(str, args.seeds))}; test MAE = mean of "
             f"{', '.join(TARGETS)} (mmHg; the test set's own SD: "
             + ", ".join(f"{test[t].std():.1f}" for t in TARGETS) + ")", "",
             "| labelled subjects | scratch | SSL (all objectives) | SSL / scratch | "
             + " | ".join(f"{o} alone" for o in results if o not in ("scratch", "all")) + " |",
             "|---|---|---|---|" + "---|" * (len(results) - 2)]
    for n in args.label_counts:
        scratch, best = results["scratch"][n], results["all"][n]
        alone = [_cell(results[o][n]) if n in results[o] else "-"
                 for o in results if o not in ("scratch", "all")]
        lines.append(f"| {n} | {_cell(scratch)} | {_cell(best)} | "
                     f"{np.mean(best) / np.mean(scratch):.2f} | " + " | ".join(alone) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- BIDMC
def bidmc(args) -> str:
    base = os.path.join(args.out, "bidmc")
    h5, npz, labels = (os.path.join(base, f) for f in ("bidmc.h5", "npz", "labels.csv"))
    if not os.path.isfile(labels):
        os.makedirs(base, exist_ok=True)
        run(["make_cohort_h5.py", "wfdb", "--records", args.bidmc, "--out", h5, "--overwrite"])
        run(["prepare_kailuan_npz.py", "--h5_path", h5, "--subject_key", "subject",
             "--target_cols", "--output_npz", npz, "--output_csv", labels,
             "--target_seq_len", str(args.bidmc_seq_len), "--workers", "2"])
    rows = []
    for fusion, objectives in (("late", ["contrastive", "crossmodal", "timing"]),
                               ("early", ["contrastive", "timing"])):
        out = os.path.join(base, f"ssl_{fusion}")
        tic = time.perf_counter()
        if not os.path.isfile(os.path.join(out, "ssl_history.csv")):
            run(["pretrain_ssl.py", "--npz_dir", npz, "--labels_csv", labels, "--out_dir", out,
                 "--overwrite", "--arch", args.arch, "--modality", "both", "--fusion", fusion,
                 "--objectives", *objectives, "--epochs", str(args.bidmc_epochs),
                 "--batch_size", str(args.ssl_batch), "--num_workers", "0",
                 "--val_ratio", str(args.bidmc_heldout),
                 "--monitor_every", str(max(1, args.bidmc_epochs // 4)), *threads(args)])
        history = pd.read_csv(os.path.join(out, "ssl_history.csv"))
        rows.append((fusion, history, time.perf_counter() - tic))
    return bidmc_table(args, rows)


def bidmc_table(args, rows) -> str:
    first = rows[0][1]
    n = int(first["heldout_records"].iloc[0])
    lines = [f"BIDMC: {n} held-out 10 s windows ({args.bidmc_heldout:.0%} of the records, none "
             f"seen in pre-training), --arch {args.arch}, {args.bidmc_epochs} epochs; "
             f"before -> after pre-training", "",
             "| fusion | timing accuracy (chance 0.5) | cross-modal top-1, window "
             f"(chance {1 / n:.4f}) | cross-modal top-1, same record | contrastive top-1 |",
             "|---|---|---|---|---|"]
    for fusion, history, _ in rows:
        start, end = history.iloc[0], history.iloc[-1]

        def cell(col):
            return f"{start[col]:.3f} -> {end[col]:.3f}" if col in history.columns else "-"

        lines.append(f"| {fusion} | {cell('heldout_acc_timing')} | "
                     f"{cell('heldout_acc_crossmodal')} | "
                     f"{cell('heldout_acc_crossmodal_subject')} | "
                     f"{cell('heldout_acc_contrastive')} |")
    return "\n".join(lines)


def main() -> None:
    args = get_args_parser().parse_args()
    os.makedirs(args.out, exist_ok=True)
    tic = time.perf_counter()
    parts = []
    if not args.skip_synthetic:
        parts.append(synthetic(args))
    if args.bidmc:
        parts.append(bidmc(args))
    text = "\n\n".join(parts) + f"\n\n(total {time.perf_counter() - tic:.0f} s)"
    write_text_atomic(os.path.join(args.out, "ssl_table.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
