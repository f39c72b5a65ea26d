"""jacext.ntk against J J^T built from the autograd-loop Jacobians."""


import pytest
import torch
from reference import assert_close, loop_jacobian
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jacext.kernels
from jacext.kernels import ntk, ntk_vp, top_eigenvalues

MODES = ["full", "trace", "diagonal"]


class Scalar(nn.Module):
    """One scalar output per sample: out has shape (N,)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.block = nn.Sequential(nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 5))
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + self.block(h))


class Tied(nn.Module):
    """A module called twice and an embedding tied to the output layer; out (N, T, vocab)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(self.mix(torch.tanh(self.mix(self.emb(tokens)))))


class Bag(nn.Module):
    """Embedding of a token sequence, flattened into a classifier."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.head = nn.Linear(3 * 4, 2)

    def forward(self, tokens):
        return self.head(self.emb(tokens).flatten(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) * self.b(z)


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def float_inputs(n, dtype):
    return torch.randn(n, 4, dtype=dtype)


def token_inputs(n, dtype, length=4, vocab=5):
    return torch.randint(0, vocab, (n, length))


CASES = {
    "mlp": (mlp, float_inputs),
    "scalar": (Scalar, float_inputs),
    "residual": (Residual, float_inputs),
    "tied": (Tied, lambda n, dtype: token_inputs(n, dtype, length=2)),
    "embedding": (Bag, lambda n, dtype: token_inputs(n, dtype, vocab=7)),
}


def flat_loop_jacobians(model, x):
    """{name: (N, C, P_k)} from the autograd loop."""
    out_dims = model(x).shape[1:]
    return {name: j.reshape(j.shape[0], out_dims.numel(), -1) for name, j in loop_jacobian(model, x).items()}


def expected_kernel(j1, j2, mode, scalar_output):
    """The mode's kernel from flat Jacobians (N, C, P) by the textbook formula J1 J2^T."""
    full = torch.einsum("acp,bdp->abcd", j1, j2)
    if mode == "trace":
        return full.diagonal(dim1=2, dim2=3).sum(-1)
    kernel = full if mode == "full" else full.diagonal(dim1=2, dim2=3)
    return kernel.reshape(kernel.shape[:2]) if scalar_output else kernel


def model_and_inputs(case, dtype, n1=5, n2=4):
    make, inputs = CASES[case]
    model = make().to(dtype)
    return model, inputs(n1, dtype), inputs(n2, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_and_layers_against_loop(case, mode, dtype):
    model, x1, x2 = model_and_inputs(case, dtype)
    scalar_output = case == "scalar"
    j1, j2 = flat_loop_jacobians(model, x1), flat_loop_jacobians(model, x2)
    cat = lambda j: torch.cat(list(j.values()), dim=2)  # noqa: E731
    for x_b, j_b in [(None, j1), (x2, j2)]:
        expected = expected_kernel(cat(j1), cat(j_b), mode, scalar_output)
        given = "None" if x_b is None else "given"
        assert_close(ntk(model, x1, x_b, mode=mode), expected, dtype, f"{case} kernel, x2 {given}")
        layers = ntk(model, x1, x_b, mode=mode, per_layer=True)
        assert list(layers) == list(j1)
        scale = expected.abs().max().item()
        for name, part in layers.items():
            layer = expected_kernel(j1[name], j_b[name], mode, scalar_output)
            assert_close(part, layer, dtype, f"{case} layer {name}, x2 {given}", scale)


@pytest.mark.parametrize("case", list(CASES))
def test_symmetric_kernel_equals_kernel_with_x2_given(case):
    model, x, _ = model_and_inputs(case, torch.float64)
    assert_close(ntk(model, x), ntk(model, x, x), torch.float64, case)


def test_kernel_shapes():
    x = torch.randn(5, 4)
    assert ntk(mlp(), x).shape == (5, 5, 3, 3)
    assert ntk(mlp(), x, x[:2], mode="trace").shape == (5, 2)
    assert ntk(mlp(), x, mode="diagonal").shape == (5, 5, 3)
    assert ntk(Tied(), torch.randint(0, 5, (5, 2))).shape == (5, 5, 10, 10)
    for mode in MODES:
        assert ntk(Scalar(), x, x[:2], mode=mode).shape == (5, 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["mlp", "scalar", "residual", "embedding"])
def test_blockwise_equals_one_shot(case, mode):
    model, x1, x2 = model_and_inputs(case, torch.float64, n1=7, n2=5)
    for x_b in [None, x2]:
        one_shot = ntk(model, x1, x_b, mode=mode, per_layer=True)
        loaders = [DataLoader(TensorDataset(x), batch_size=3) for x in (x1, x2)]
        variants = {
            "DataLoader": ntk(model, loaders[0], None if x_b is None else loaders[1], mode=mode, per_layer=True),
            "list of batches": ntk(
                model, list(x1.split(2)), None if x_b is None else list(x2.split(4)), mode=mode, per_layer=True
            ),
            "batch_size": ntk(model, x1, x_b, mode=mode, per_layer=True, batch_size=2),
        }
        for how, blockwise in variants.items():
            for name, expected in one_shot.items():
                given = "None" if x_b is None else "given"
                assert_close(blockwise[name], expected, torch.float64, f"{how}, x2 {given}, {name}")


def test_blockwise_computes_each_jacobian_once_per_block(monkeypatch):
    """x2=None: batch a's Jacobian once, then one for each block (a, b > a); x2 given: one per block."""
    calls = []
    module = jacext.kernels
    blocks = module._jacobian_blocks
    monkeypatch.setattr(
        module, "_jacobian_blocks", lambda model, args: calls.append(len(args[0])) or blocks(model, args)
    )
    x = torch.randn(7, 4)
    ntk(mlp(), x, batch_size=3)  # batches of 3, 3, 1
    assert calls == [3, 3, 1, 3, 1, 1]
    calls.clear()
    ntk(mlp(), x, x[:4], batch_size=3)
    assert calls == [3, 3, 1, 3, 3, 1, 1, 3, 1]


def test_tuple_inputs_split_into_batches():
    model = TwoInputs().double()
    x, z = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    j = torch.cat([j.reshape(5, 3, -1) for j in loop_jacobian(model, x, z).values()], dim=2)
    expected = torch.einsum("acp,bdp->abcd", j, j)
    assert_close(ntk(model, (x, z)), expected, torch.float64, "one batch")
    assert_close(ntk(model, (x, z), batch_size=2), expected, torch.float64, "batches of 2")


def test_summing_logits_first_gives_another_kernel():
    """The trap: differentiating out.sum(1) gives sum_{c,d} K[c, d], not the kernel; the
    reference comparison above would catch it (it differs from full and trace)."""
    model, x = mlp().double(), torch.randn(6, 4, dtype=torch.float64)
    params = list(model.parameters())
    summed_logits = [torch.autograd.grad(model(x[n : n + 1]).sum(), params) for n in range(6)]
    rows = torch.stack([torch.cat([g.reshape(-1) for g in grads]) for grads in summed_logits])
    naive = rows @ rows.T
    full = ntk(model, x)
    torch.testing.assert_close(full.sum((2, 3)), naive, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(naive, ntk(model, x, mode="trace"), rtol=1e-3)
    assert not torch.allclose(naive, full[:, :, 0, 0], rtol=1e-3)


@pytest.mark.parametrize("case", ["mlp", "scalar", "tied"])
def test_kernel_vector_product(case, dtype):
    model, x1, x2 = model_and_inputs(case, dtype)
    flat = lambda x: torch.cat([j.flatten(0, 1) for j in flat_loop_jacobians(model, x).values()], dim=1)  # noqa: E731
    for x_b in [None, x2]:
        x_b_or_x1 = x1 if x_b is None else x_b
        v = torch.randn_like(model(x_b_or_x1).detach())
        expected = flat(x1) @ (flat(x_b_or_x1).T @ v.reshape(-1))
        out_shape = model(x1).shape
        assert_close(ntk_vp(model, x1, v, x_b), expected.reshape(out_shape), dtype, f"{case} K v")


@pytest.mark.parametrize("method", ["eigvalsh", "lobpcg", "auto"])
def test_top_eigenvalues(method):
    model, x = mlp().double(), torch.randn(12, 4, dtype=torch.float64)
    j = torch.cat([j.reshape(12, 3, -1) for j in loop_jacobian(model, x).values()], dim=2)
    full = j.reshape(36, -1) @ j.reshape(36, -1).T
    trace = torch.einsum("acp,bcp->ab", j, j)
    for mode, kernel, k in [("full", full, 5), ("trace", trace, 3)]:
        expected = torch.linalg.eigvalsh(kernel).flip(0)[:k]
        torch.testing.assert_close(top_eigenvalues(model, x, k, mode=mode, method=method), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_linear_weights_use_the_structured_contraction_over_sequences(mode, monkeypatch):
    """Linear over (N, T, in): the kernel comes from Gram matrices of X and G, never J_W."""
    module = jacext.kernels
    dense = module._dense
    monkeypatch.setattr(
        module, "_dense", lambda f: pytest.fail("a Linear weight was densified") if isinstance(f, tuple) else dense(f)
    )

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))).mean(1)

    model, x1, x2 = Seq().double(), torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    j1, j2 = (torch.cat([j.reshape(len(x), 2, -1) for j in loop_jacobian(model, x).values()], dim=2) for x in (x1, x2))
    full = torch.einsum("acp,bdp->abcd", j1, j2)
    expected = {"full": full, "trace": full.diagonal(0, 2, 3).sum(-1), "diagonal": full.diagonal(0, 2, 3)}[mode]
    assert_close(ntk(model, x1, x2, mode=mode), expected, torch.float64, mode)
