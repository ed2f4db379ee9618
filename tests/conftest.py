"""Pytest set-up: the repo root on sys.path, paths to the shipped fixtures, and helpers
shared by the end-to-end tests."""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Predictions that went through the network in another process, batch or kernel agree to
# float32 precision, not to the last bit: about 1e-6 relative on the normalised outputs,
# plus the 1e-4 mmHg rounding of every reported value (engine.MMHG_DECIMALS), which a
# difference in the last bits can tip either way. Exact equality is kept only where the
# path is bit-identical by construction (same machine, process settings and batches).
MMHG_ATOL = 1e-3


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a failed CLI run, last on stderr (progress bars may
    stand before it), with no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


def prepared_cohort(base, n_subjects, records_per_subject, seed, target_cols, seq_len=400,
                    extra_cols=()):
    """A synthetic cohort in ``base`` prepared by prepare_kailuan_npz.py: paths of the
    HDF5 (``h5``), the npz folder (``npz``) and the labels CSV (``labels``)."""
    import make_synthetic_cohort
    import prepare_kailuan_npz

    h5 = str(base / "cohort.h5")
    make_synthetic_cohort.make_cohort(h5, n_subjects=n_subjects,
                                      records_per_subject=records_per_subject, seed=seed)
    npz, labels = str(base / "npz"), str(base / "labels.csv")
    prepare_kailuan_npz.main(["--h5_path", h5, "--id_key", "new_id", "--target_cols",
                              *target_cols, "--output_npz", npz, "--output_csv", labels,
                              "--target_seq_len", str(seq_len), "--workers", "1",
                              *(["--extra_cols", *extra_cols] if extra_cols else [])])
    return {"h5": h5, "npz": npz, "labels": labels, "base": base}


def wait_for_epochs(proc, history, n, timeout=300.0):
    """Poll until ``history`` (a history.csv) holds ``n`` epochs or ``proc`` has ended."""
    import pandas as pd

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(pd.read_csv(history)) >= n:
            return
        time.sleep(0.02)
