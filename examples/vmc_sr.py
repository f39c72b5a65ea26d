"""Variational ground state of a transverse-field Ising chain with stochastic reconfiguration.

A small network maps a spin configuration s in {-1, +1}^L to one scalar per sample, the
log-amplitude log psi(s) of the wave function. The chain

    H = -J sum_i s^z_i s^z_{i+1} - h sum_i s^x_i        (periodic boundary)

is small enough to enumerate all 2^L configurations, so every "sample" is one configuration
with weight p(s) = |psi(s)|^2 / sum |psi|^2 and local energy

    E_loc(s) = (H psi)(s) / psi(s) = -J sum_i s_i s_{i+1} - h sum_i psi(flip_i s) / psi(s),

computed exactly; the energy is E = sum_s p(s) E_loc(s). jacext gives the per-sample
Jacobian O(s) = d log psi(s) / d theta, (2^L, P), in the backward pass that also fills the
energy gradient; the SR optimizer (``center=True``, weights p) takes imaginary-time steps
theta -= tau (S + damping)^{-1} F, S and F the covariances of O with itself and with
E_loc, solved in sample space (minSR) or parameter space (SR). The energy per step is
printed against the exact ground-state energy (eigvalsh of the 2^L x 2^L Hamiltonian).

    python examples/vmc_sr.py [--spins 10] [--steps 300] [--mode minsr|sr]
    python examples/vmc_sr.py --quick
"""

import argparse

import torch
from backpack import backpack
from torch import nn

import jacext
from jacext.natural_gradient import SR


def configurations(spins):
    """All 2^L configurations, row k holding the bits of k as -1/+1: (2^L, L)."""
    bits = (torch.arange(2**spins).unsqueeze(1) >> torch.arange(spins)) & 1
    return (2 * bits - 1).double()


def diagonal_energy(s, coupling):
    """-J sum_i s_i s_{i+1} for every configuration (periodic chain)."""
    return -coupling * (s * s.roll(-1, dims=1)).sum(1)


def flipped(spins):
    """Index of the configuration with spin i flipped, for every configuration: (2^L, L)."""
    return torch.arange(2**spins).unsqueeze(1) ^ (1 << torch.arange(spins))


def hamiltonian(spins, coupling, field):
    """The dense 2^L x 2^L Hamiltonian in the same basis."""
    s = configurations(spins)
    h = torch.diag(diagonal_energy(s, coupling))
    rows = torch.arange(2**spins).unsqueeze(1).expand(-1, spins)
    h[rows.reshape(-1), flipped(spins).reshape(-1)] = -field
    return h


def local_energies(log_psi, diagonal, flips, field):
    """E_loc(s) = diag(s) - h sum_i psi(flip_i s) / psi(s), from log psi of every configuration."""
    return diagonal - field * (log_psi[flips] - log_psi.unsqueeze(1)).exp().sum(1)


class LogAmplitude(nn.Module):
    """log psi(s): a one-hidden-layer network with one scalar output per configuration."""

    def __init__(self, spins, hidden):
        super().__init__()
        self.hidden = nn.Linear(spins, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.normal_(self.out.weight, std=0.01)  # start close to the uniform state

    def forward(self, s):
        return self.out(torch.tanh(self.hidden(s))).squeeze(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spins", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=None, help="hidden units (default 2 L)")
    parser.add_argument("--coupling", type=float, default=1.0, help="J")
    parser.add_argument("--field", type=float, default=1.0, help="h (h = J is the critical point)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05, help="imaginary-time step tau")
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--mode", choices=["minsr", "sr"], default="minsr")
    parser.add_argument("--every", type=int, default=10, help="print every this many steps")
    parser.add_argument("--quick", action="store_true", help="a reduced run: 6 spins, 40 steps")
    args = parser.parse_args()
    if args.quick:
        args.spins, args.steps, args.every = 6, 40, 5

    torch.manual_seed(0)
    s = configurations(args.spins)
    diagonal, flips = diagonal_energy(s, args.coupling), flipped(args.spins)
    exact = torch.linalg.eigvalsh(hamiltonian(args.spins, args.coupling, args.field))[0].item()
    model = jacext.extend(LogAmplitude(args.spins, args.hidden or 2 * args.spins).double())
    opt = SR(model.parameters(), lr=args.lr, damping=args.damping, mode=args.mode, center=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"TFIM chain, L={args.spins}, J={args.coupling}, h={args.field}: {len(s)} configurations, "
          f"{n_params} parameters, {args.mode} steps; exact ground-state energy {exact:.6f}")

    for step in range(args.steps + 1):
        with backpack(jacext.BatchJacobian()):
            log_psi = model(s)
            weights = torch.softmax(2 * log_psi.detach(), dim=0)  # |psi|^2, normalised
            e_loc = local_energies(log_psi.detach(), diagonal, flips, args.field)
            energy = (weights * e_loc).sum()
            # dE/dtheta = 2 sum_s p(s) (E_loc(s) - E) O(s): the backward fills p.grad with it
            log_psi.backward(2 * weights * (e_loc - energy))
        if step == 0:
            print(f"(per-sample Jacobian of log psi: {len(s)} x {n_params}, from p.jacobian of shapes "
                  f"{[tuple(p.jacobian.shape) for p in model.parameters()]})")
            print("| step | energy | relative error |\n|---|---|---|")
        if step % args.every == 0 or step == args.steps:
            print(f"| {step} | {energy.item():.6f} | {(energy.item() - exact) / abs(exact):.2e} |")
        if step < args.steps:
            opt.step(e_loc - energy, weights=weights)
            model.zero_grad()
    error = (energy.item() - exact) / abs(exact)
    print(f"final energy {energy.item():.6f}, exact {exact:.6f}, relative error {error:.2e}")


if __name__ == "__main__":
    main()
