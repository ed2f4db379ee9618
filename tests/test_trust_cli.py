"""Issue 19, what the scripts do around the work itself: a closed pipe ends quietly, prep
leaves no lock file and still keeps two runs apart, a PPG-only file names the flag to use,
crossval accepts the same folder written as another path, demo.py never deletes a user's
file, and plot texts fit inside their figures."""
import os
import subprocess
import sys

import pandas as pd
import pytest

import make_synthetic_cohort as msc
from conftest import ROOT

TARGETS = ["right_arm_sbp", "right_arm_dbp"]


@pytest.fixture(scope="module")
def cohort_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("cohort") / "cohort.h5"
    msc.make_cohort(str(path), n_subjects=4, records_per_subject=2, seed=3)
    return path


def prep_argv(h5, out, *extra):
    return ["--h5_path", str(h5), "--id_key", "new_id", "--target_cols", *TARGETS,
            "--output_npz", str(out / "npz"), "--output_csv", str(out / "labels.csv"),
            "--target_seq_len", "200", "--workers", "1", *extra]


# ----------------------------------------------------------------------------- closed pipe
def test_a_closed_pipe_ends_prep_quietly_with_status_141(cohort_h5, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (say `head -2`) has gone before prep prints its summary
    try:
        result = subprocess.run([sys.executable, "prepare_kailuan_npz.py",
                                 *prep_argv(cohort_h5, tmp_path)], cwd=ROOT, stdout=write_end,
                                stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert result.stderr == ""  # no BrokenPipeError traceback, not even at shutdown
    assert result.returncode == 141  # 128 + SIGPIPE, as a shell reports `cmd | head`
    assert len(pd.read_csv(tmp_path / "labels.csv")) == 8  # the work itself was done
