"""The NTK and SR examples run in reduced form and reach what they claim."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name, *args, cwd=None):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600, check=True, cwd=cwd
    )
    return run.stdout


def test_ntk_digits_quick(tmp_path):
    out = run_example("ntk_digits.py", "--quick", "--out", str(tmp_path / "spectrum.png"))
    assert (tmp_path / "spectrum.png").read_bytes().startswith(b"\x89PNG"), out
    accuracies = [float(a) for a in re.findall(r"test accuracy ([0-9.]+)", out)]
    assert len(accuracies) == 3 and max(accuracies) > 0.8, out


def test_ntk_digits_saves_plot_in_working_directory_by_default(tmp_path):
    run_example("ntk_digits.py", "--quick", cwd=tmp_path)
    assert (tmp_path / "ntk_spectrum.png").exists()


def test_vmc_sr_quick_approaches_ground_state():
    out = run_example("vmc_sr.py", "--quick")
    energies = [float(e) for e in re.findall(r"^\| \d+ \| (-?[0-9.]+) \|", out, flags=re.M)]
    summary = re.search(r"final energy (\S+), exact (\S+), relative error (\S+)", out)
    assert summary is not None, out
    final, exact, error = (float(v) for v in summary.groups())
    assert energies[-1] == final and energies[-1] < energies[0], out
    assert exact - 1e-9 <= final and error < 5e-3, out  # variational: never below the exact energy


def test_vmc_local_energies_give_the_rayleigh_quotient():
    spec = importlib.util.spec_from_file_location("vmc_sr", EXAMPLES / "vmc_sr.py")
    assert spec is not None and spec.loader is not None
    vmc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vmc)
    spins, coupling, field = 5, 0.7, 1.3
    s = vmc.configurations(spins)
    log_psi = torch.randn(len(s), dtype=torch.float64)
    psi = log_psi.exp()
    e_loc = vmc.local_energies(log_psi, vmc.diagonal_energy(s, coupling), vmc.flipped(spins), field)
    weights = psi.square() / psi.square().sum()
    h = vmc.hamiltonian(spins, coupling, field)
    torch.testing.assert_close((weights * e_loc).sum(), psi @ h @ psi / (psi @ psi), rtol=1e-12, atol=0)
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)
