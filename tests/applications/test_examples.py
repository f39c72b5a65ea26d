"""The examples run (in reduced form) and report agreement with their naive loops."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_digits_cnn_demo():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "digits_cnn.py"), "--epochs", "1", "--probe", "8"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    row = [line for line in run.stdout.splitlines() if line.startswith("| 1 |")][0]
    diff_j, diff_g = (float(cell) for cell in row.strip("| ").split(" | ")[-2:])
    assert diff_j < 1e-4 and diff_g < 1e-6, row


def test_dp_digits_example():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "dp_digits.py"), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    line = [line for line in run.stdout.splitlines() if line.startswith("epoch 1:")][0]
    accuracy, eps = float(line.split("accuracy ")[1].split(",")[0]), float(line.split("epsilon ")[1].split(" ")[0])
    assert accuracy > 0.3 and 0 < eps < 10, line
