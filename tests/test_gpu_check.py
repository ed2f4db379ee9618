"""benchmarks/gpu_check.py on the CPU: the --dry_run report, the one-line refusal without
CUDA, the peak table, and that one failing check neither hides the others nor passes."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, error_line

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
EXPECTED = ["train_early_bf16", "train_early_fp16", "train_early_fp32", "train_late_bf16",
            "train_late_fp16", "train_late_fp32", "synthetic_cohort",
            "end_to_end", "loader", "compile_early_bf16"]


def run_script(*argv, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def table_rows(stdout):
    """The check lines of the printed table: between the two header lines and the
    closing ``wrote ...`` line."""
    lines = stdout.splitlines()
    assert lines[0].startswith("# gpu_check: torch ") and lines[1].split()[0] == "check"
    assert lines[-1].startswith("wrote ")
    return lines[2:-1]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_check")
    out = base / "report.json"
    result = run_script("--dry_run", "--out", str(out), "--work_dir", str(base))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"report": json.loads(out.read_text()), "stdout": result.stdout, "base": base}


def test_dry_run_report_has_the_schema_and_every_check_passes(dry):
    report = dry["report"]
    assert {"device", "torch", "checks"} <= set(report)
    assert report["torch"] == torch.__version__
    assert report["device"].startswith("CPU") and report["dry_run"] is True
    assert [c["name"] for c in report["checks"]] == EXPECTED == gpu_check.CHECK_NAMES
    for check in report["checks"]:
        assert check["ok"] is True, check
        assert {"name", "ok", "seconds", "figures"} <= set(check)
        assert math.isfinite(check["seconds"]) and check["seconds"] >= 0
    assert report["ok"] is True


def test_dry_run_skips_only_what_needs_cuda_and_says_why(dry):
    skipped = {c["name"]: c["skipped"] for c in dry["report"]["checks"] if c.get("skipped")}
    assert set(skipped) == {"train_early_fp16", "train_late_fp16"}
    assert all("needs CUDA" in why for why in skipped.values())


def test_dry_run_rates_and_flops_are_finite_and_positive(dry):
    checks = {c["name"]: c for c in dry["report"]["checks"]}
    timed = [n for n in EXPECTED if n.startswith(("train_", "compile_"))
             and not checks[n].get("skipped")]
    assert len(timed) == 5
    for name in timed:
        f = checks[name]["figures"]
        for key in ("rec_s", "gflop_per_record", "tflop_s"):
            assert math.isfinite(f[key]) and f[key] > 0, (name, key, f[key])
        assert f["tflop_s"] == pytest.approx(f["gflop_per_record"] * f["rec_s"] / 1e3)
        assert f["fraction_of_bf16_peak"] is None  # no peak for a CPU
        assert f["peak_memory_gib"] is None
    # late fusion runs two encoders: about twice the FLOPs of early fusion
    early, late = (checks[f"train_{x}_bf16"]["figures"]["gflop_per_record"]
                   for x in ("early", "late"))
    assert 1.5 * early < late < 2.5 * early
    assert checks["compile_early_bf16"]["figures"]["backend"] == "eager"
    loader = checks["loader"]["figures"]
    for key in ("npz_rec_s", "cache_rec_s", "bare_np_load_rec_s", "cache_over_step",
                "npz_over_step"):
        assert math.isfinite(loader[key]) and loader[key] > 0, key
    assert loader["bf16_step_rec_s"] == max(checks[f"train_{x}_bf16"]["figures"]["rec_s"]
                                            for x in ("early", "late"))
    assert loader["cache_over_step"] == pytest.approx(
        loader["cache_rec_s"] / loader["bf16_step_rec_s"])


def test_dry_run_end_to_end_trains_under_torchrun_and_predict_reproduces_it(dry):
    f = {c["name"]: c for c in dry["report"]["checks"]}["end_to_end"]["figures"]
    assert f["predict_max_abs_diff_mmhg"] <= 1e-3
    assert f["predict_tolerance_mmhg"] == 1e-3
    assert f["n_test_records"] > 0
    assert all(math.isfinite(f[k]) for k in ("val_mae_mean", "test_mae_mean"))
    # a torchrun launch of one process runs the process group and DDP (gloo on the CPU)
    assert f["train_summary"].startswith("device cpu  ") and "processes 1 (gloo)" in f["train_summary"]
    assert len(f["train_records_per_s"]) == 2  # --epochs 2
    # --work_dir keeps the run for inspection
    run = dry["base"] / os.path.basename(dry["report"]["work_dir"]) / "e2e" / "run"
    assert (run / "final_metrics.json").is_file() and (run / "bp_best.pth").is_file()


def test_dry_run_prints_one_table_line_per_check(dry):
    rows = table_rows(dry["stdout"])
    assert [r.split()[0] for r in rows] == EXPECTED
    assert [r.split()[1] for r in rows] == ["skip" if "fp16" in n else "ok" for n in EXPECTED]
    assert "\r" not in dry["stdout"]


def test_a_failing_check_fails_the_run_without_hiding_the_others(tmp_path):
    # the training subprocess cannot even import torch in 1 s: end_to_end fails, the
    # loader check after it still runs and passes, the exit status is 1
    out = tmp_path / "report.json"
    result = run_script("--dry_run", "--out", str(out), "--skip", "train", "compile",
                        "--timeout", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    e2e = checks["end_to_end"]
    assert e2e["ok"] is False and e2e["error"] == "torchrun train_bp.py exited -1"
    assert "killed after 1 s" in e2e["log_tail"]
    assert checks["loader"]["ok"] is True
    assert checks["loader"]["figures"]["cache_over_step"] is None  # no step rate measured
    assert checks["train_early_bf16"] == {"name": "train_early_bf16", "ok": True,
                                          "skipped": "--skip", "figures": {}, "seconds": 0.0}
    rows = table_rows(result.stdout)
    assert len(rows) == len(EXPECTED)
    assert [r.split()[:2] for r in rows if "FAIL" in r] == [["end_to_end", "FAIL"]]
    assert result.stdout.splitlines()[-1].endswith("1 failed (end_to_end)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_refuses_in_one_line():
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert error_line(result.stderr) == ("error: no CUDA device: gpu_check.py needs a GPU "
                                         "(use --dry_run to test its logic on CPU)")
    assert result.stdout == ""


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA GeForce RTX 4090", 165.0), ("Tesla T4", None)])
def test_bf16_peak_is_looked_up_by_device_name(name, peak):
    assert gpu_check.bf16_peak(name) == peak
