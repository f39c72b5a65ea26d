"""Complex parameters, against the loop: every result is what autograd gives for a real loss.

A complex parameter p = a + i b gets, per sample, autograd's p.grad of that sample's loss,
d l/da + i d l/db (``grad_batch``); the sum of the squared real and imaginary parts
(``batch_l2``); for a real output z, the same of each z[n, c] (``jacobian``); ClipGrad clips
the norm of (d l/da, d l/db). Layers whose output is holomorphic in their parameters (Linear,
Conv, ConvTranspose) keep their hand-written rules, on conj(G) and conjugated; the
NTK and the SR step count a complex parameter as its real
and imaginary parts, and the DP noise is drawn in each part. Complex outputs are returned as
``torch.view_as_real``. N equals the sequence length.
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian, squared_norms, trainable
from torch import nn

import jacext
from jacext.dp import ClipGrad
from jacext.dp.optimizer import gaussian_noise
from jacext.natural_gradient import SR

N = T = 4
COMPLEX = {torch.float64: torch.complex128, torch.float32: torch.complex64}


class AsReal(nn.Module):
    """A complex (N, ...) as the real (N, ... * 2)."""

    def forward(self, z):
        return torch.view_as_real(z).flatten(1)


class Head(nn.Module):
    """A real stem's features times a complex parameter used in the parent's forward (a meet)."""

    def __init__(self, dtype):
        super().__init__()
        self.stem = nn.Linear(3, 3, dtype=dtype)
        self.w = nn.Parameter(torch.randn(2, 3, dtype=COMPLEX[dtype]))

    def forward(self, x):
        return torch.view_as_real(torch.tanh(self.stem(x)).to(self.w.dtype) @ self.w.T).flatten(1)


class Positions(nn.Module):
    """A batch-free complex parameter added to every sample's sequence, then a complex Linear."""

    def __init__(self, dtype):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, 3, dtype=COMPLEX[dtype]))
        self.lin = nn.Linear(3, 2, dtype=COMPLEX[dtype])

    def forward(self, x):
        return torch.view_as_real(self.lin(x.to(self.pos.dtype) + self.pos).sum(1)).flatten(1)


def mlp(dtype):
    c = COMPLEX[dtype]
    return nn.Sequential(nn.Linear(3, 4, dtype=c), nn.Tanh(), nn.Linear(4, 2, dtype=c), AsReal())


def sequence(dtype):  # a Linear over T positions, N = T
    c = COMPLEX[dtype]
    return nn.Sequential(nn.Linear(3, 4, dtype=c), nn.Tanh(), nn.Linear(4, 1, dtype=c), nn.Flatten(), AsReal())


def conv(dtype):
    c = COMPLEX[dtype]
    return nn.Sequential(nn.Conv1d(2, 3, 3, dtype=c), nn.Tanh(), nn.Flatten(), nn.Linear(6, 2, dtype=c), AsReal())


def transposed(dtype):
    c = COMPLEX[dtype]
    layers = [nn.ConvTranspose1d(2, 2, 3, stride=2, dtype=c), nn.Flatten(), nn.Linear(18, 1, dtype=c), AsReal()]
    return nn.Sequential(*layers)


class Shared(nn.Module):
    """One complex Linear called twice (its results summed over the calls)."""

    def __init__(self, dtype):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=COMPLEX[dtype])

    def forward(self, x):
        return torch.view_as_real(self.lin(torch.tanh(self.lin(x)))).flatten(1)


def modulus(dtype):  # |z|: a real output that is no holomorphic function of the parameters
    c = COMPLEX[dtype]
    return nn.Sequential(nn.Linear(3, 2, dtype=c), Modulus())


class Modulus(nn.Module):
    def forward(self, z):
        return z.abs()


MODELS = {
    "mlp": (mlp, lambda d: torch.randn(N, 3, dtype=COMPLEX[d])),
    "sequence": (sequence, lambda d: torch.randn(N, T, 3, dtype=COMPLEX[d])),
    "conv": (conv, lambda d: torch.randn(N, 2, 4, dtype=COMPLEX[d])),
    "transposed": (transposed, lambda d: torch.randn(N, 2, 4, dtype=COMPLEX[d])),
    "shared": (Shared, lambda d: torch.randn(N, 3, dtype=COMPLEX[d])),
    "modulus": (modulus, lambda d: torch.randn(N, 3, dtype=COMPLEX[d])),
    "functional head": (Head, lambda d: torch.randn(N, 3, dtype=d)),
    "batch-free": (Positions, lambda d: torch.randn(N, T, 3, dtype=d)),
}


def sq_loss(out, y):
    return (out - y).square().sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(MODELS))
def test_complex_parameters_against_the_loop(name, dtype):
    make, inputs = MODELS[name]
    torch.manual_seed(0)
    model, x = make(dtype), inputs(dtype)
    y = torch.randn_like(model(x))
    grads, jacobians = loop_grad_batch(model, sq_loss, y, x), loop_jacobian(model, x)
    assert any(p.is_complex() for p in model.parameters())
    jacext.extend(model)
    model.zero_grad()
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad(), jacext.BatchJacobian()):
        sq_loss(model(x), y).backward()
    scale, scale_jac = max(g.abs().max() for g in grads.values()), max(j.abs().max() for j in jacobians.values())
    for pname, p in trainable(model):
        assert p.grad_batch.dtype == p.jacobian.dtype == p.dtype and p.batch_l2.dtype == dtype
        assert_close(p.grad_batch, grads[pname], dtype, f"grad_batch of {pname}", scale)
        assert_close(p.batch_l2, squared_norms(grads[pname]), dtype, f"batch_l2 of {pname}", scale**2)
        assert_close(p.jacobian, jacobians[pname], dtype, f"jacobian of {pname}", scale_jac)
        assert_close(p.grad, grads[pname].sum(0), dtype, f"grad of {pname}", scale)
    norms = sum(squared_norms(g) for g in grads.values()).sqrt()
    bound = norms.median().item()
    w = (bound / (norms + 1e-6)).clamp(max=1.0)
    model.zero_grad()
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        sq_loss(model(x), y).backward()
    for pname, p in trainable(model):
        clipped = torch.einsum("n,n...->...", w.to(p.dtype), grads[pname])
        assert_close(p.grad, clipped, dtype, f"clipped grad of {pname}", scale)


def test_the_convention_on_a_holomorphic_layer():
    """z = w . x with complex w, returned as (Re z, Im z): autograd's d/da + i d/db of Re z is
    conj(x) (conj of the holomorphic derivative dz/dw = x), and of Im z it is i conj(x)."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 1, bias=False, dtype=torch.complex128)
    model = jacext.extend(nn.Sequential(lin, AsReal()))
    x = torch.randn(N, 3, dtype=torch.complex128)
    with backpack(jacext.BatchJacobian()):
        out = model(x)
        out.backward(torch.ones_like(out))
    jac = lin.weight.jacobian  # (N, 2, 1, 3)
    torch.testing.assert_close(jac[:, 0, 0], x.conj(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac[:, 1, 0], 1j * x.conj(), rtol=1e-12, atol=1e-12)


def real_jacobian(model, x):
    """The loop's Jacobian (N, C, P) over the real and imaginary parts of every parameter."""
    parts = []
    for j in loop_jacobian(model, x).values():
        j = j.flatten(2)
        parts += [j.real, j.imag] if j.is_complex() else [j]
    return torch.cat(parts, dim=2)


def test_ntk_counts_real_and_imaginary_parts():
    torch.manual_seed(0)
    model = mlp(torch.float64)
    x1, x2 = torch.randn(N, 3, dtype=torch.complex128), torch.randn(N + 1, 3, dtype=torch.complex128)
    j1, j2 = real_jacobian(model, x1), real_jacobian(model, x2)
    expected = torch.einsum("mcp,ndp->mncd", j1, j2)
    got = jacext.ntk(model, x1, x2)
    assert got.dtype == torch.float64
    assert_close(got, expected, torch.float64, "ntk")
    v = torch.randn(N + 1, 4, dtype=torch.float64)
    assert_close(jacext.ntk_vp(model, x1, v, x2), torch.einsum("mncd,nd->mc", expected, v), torch.float64, "ntk_vp")


@pytest.mark.parametrize("mode", ["minsr", "sr"])
def test_sr_steps_real_and_imaginary_parts(mode):
    """The SR step of complex parameters is the real least-squares step over (a, b)."""
    torch.manual_seed(0)
    model = mlp(torch.float64)
    x = torch.randn(N, 3, dtype=torch.complex128)
    j = real_jacobian(model, x).flatten(0, 1)
    r = torch.randn(N, 4, dtype=torch.float64)
    damping = 1e-3
    if mode == "minsr":
        delta = j.T @ torch.linalg.solve(j @ j.T + damping * torch.eye(j.shape[0], dtype=j.dtype), r.reshape(-1))
    else:
        metric = j.T @ j / N + damping / N * torch.eye(j.shape[1], dtype=j.dtype)
        delta = torch.linalg.solve(metric, j.T @ r.reshape(-1) / N)
    before = [p.detach().clone() for p in model.parameters()]
    jacext.extend(model)
    opt = SR(model.parameters(), lr=0.5, damping=damping, mode=mode)
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    opt.step(r)
    offset = 0
    for p, p0 in zip(model.parameters(), before, strict=True):
        k = p.numel()
        step = torch.complex(delta[offset : offset + k], delta[offset + k : offset + 2 * k]).view_as(p)
        torch.testing.assert_close(p.detach(), p0 - 0.5 * step, rtol=1e-9, atol=1e-10)
        offset += 2 * k


@pytest.mark.parametrize("secure", [False, True])
def test_dp_noise_has_the_standard_deviation_in_each_part(secure):
    like = torch.zeros(200, 300, dtype=torch.complex128)
    noise = gaussian_noise(0.5, like, torch.Generator().manual_seed(0), secure=secure)
    assert noise.dtype == like.dtype and noise.shape == like.shape
    for part in (noise.real, noise.imag):
        assert abs(part.std().item() - 0.5) < 0.01 and abs(part.mean().item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([noise.real.flatten(), noise.imag.flatten()]))[0, 1].item()) < 0.02
