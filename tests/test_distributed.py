"""jacext under torch.distributed: DistributedDataParallel, DP-SGD under DDP, NTK blocks.

Two processes on loopback with the gloo backend (CPU). The parent computes float64
single-process references with the autograd loops of ``reference.py`` (no jacext); each rank
runs its shard of the batch and saves what it found; the parent compares. Starting the two
processes costs most of the time, so each group of cases runs in one start (a module-scoped
fixture) and the tests check their case's results.

jacext only uses forward hooks and a tensor hook on the extended module's output; DDP's
reducer hooks the parameters' gradient accumulators and, with ``find_unused_parameters`` or
``static_graph``, routes the output through its ``_DDPSink``. The tests cover these variants.
"""

import copy
import datetime
import gc
import os
import socket
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian, overall_scale, trainable
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import jacext
from jacext.dp import DPSGD, ClipGrad

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

WORLD = 2
F64 = torch.float64


# ---------------------------------------------------------------- running two ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, task, port: int, folder: str) -> None:
    """Child process: join the gloo group, run ``task(rank, **kwargs)`` for every case, save."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        cases = torch.load(os.path.join(folder, "cases.pt"))
        results = {name: task(rank, **kwargs) for name, kwargs in cases.items()}
    finally:
        gc.collect()  # the models, their graphs and DDP's hooks go before the process group does
        dist.destroy_process_group()
    torch.save(results, os.path.join(folder, f"result{rank}.pt"))


def run_ranks(task, folder, cases: dict) -> dict:
    """``{case: [task(rank, **cases[case]) for rank in range(WORLD)]}``, each rank in its own
    process (the cases one after the other in the same two processes)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
            env.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the host name resolves to
        torch.save(cases, folder / "cases.pt")
        mp.spawn(_worker, args=(task, _free_port(), str(folder)), nprocs=WORLD, join=True)
    per_rank = [torch.load(folder / f"result{rank}.pt") for rank in range(WORLD)]
    return {name: [results[name] for results in per_rank] for name in cases}


# ---------------------------------------------------------------- model and data


class Net(nn.Module):
    """Conv1d, Linear, LayerNorm, Linear; ``unused`` adds a module the forward never calls."""

    def __init__(self, unused: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4), nn.Linear(4, 3)
        )
        self.unused = nn.Linear(3, 3) if unused else None

    def forward(self, x):
        return self.body(x)


def make_net(state=None, unused=False) -> Net:
    torch.manual_seed(0)
    net = Net(unused).to(F64)
    if state is not None:
        net.load_state_dict(state)
    return net


def make_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, dtype=F64, generator=g) * 3, torch.randint(0, 3, (n,), generator=g)


def full_gradient(model, lossfunc, x, y):
    """{name: d loss / d p}, zeros where the loss does not reach p."""
    params = trainable(model)
    grads = torch.autograd.grad(lossfunc(model(x), y), [p for _, p in params], allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params, grads, strict=True)}


def assert_all_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    scale = overall_scale(expected)
    for name in expected:
        assert_close(actual[name], expected[name], F64, f"{what} {name}", scale)


def differ(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8) for k in a)


# ---------------------------------------------------------------- 1. per-sample quantities under DDP

VARIANTS = {  # DDP's options; a module that the forward never calls; jacext.extend(DDP(net))
    "default": dict(options={}, unused=False, outside=False),
    "find_unused_parameters": dict(options=dict(find_unused_parameters=True), unused=True, outside=False),
    "static_graph": dict(options=dict(static_graph=True, gradient_as_bucket_view=True), unused=False, outside=False),
    "extend_outside": dict(options={}, unused=False, outside=True),
}


def _ddp_task(rank, state, batches, lr, options, unused, outside):
    """Two SGD iterations of DDP(jacext.extend(net)) (or jacext.extend(DDP(net))) on this
    rank's half of each batch."""
    net = make_net(state, unused)
    model = jacext.extend(DDP(net, **options)) if outside else DDP(jacext.extend(net), **options)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    lossfunc = nn.CrossEntropyLoss()
    found = []
    for x, y in batches:
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad()
        with backpack(jacext.BatchGrad(), jacext.BatchJacobian()):
            lossfunc(model(x), y).backward()
        params = trainable(model.module)
        found.append({
            "grad_batch": {name: p.grad_batch.clone() for name, p in params},
            "jacobian": {name: p.jacobian.clone() for name, p in params},
            "grad": {name: None if p.grad is None else p.grad.clone() for name, p in params},
        })
        opt.step()
    return found


LR = 0.5
BATCHES = [make_batch(8, seed=1), make_batch(8, seed=2)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    cases = {
        v: dict(state=make_net(unused=c["unused"]).state_dict(), batches=BATCHES, lr=LR, **c)
        for v, c in VARIANTS.items()
    }
    return run_ranks(_ddp_task, tmp_path_factory.mktemp("ddp"), cases)


def _ddp_references(net, batches, lr):
    """Per iteration: each half's per-sample gradients and Jacobians, and the full-batch gradient
    of the mean loss, which is what DDP's average of the halves' mean-loss gradients must give."""
    net, lossfunc = copy.deepcopy(net), nn.CrossEntropyLoss()
    expected = []
    for x, y in batches:
        halves = list(zip(x.chunk(WORLD), y.chunk(WORLD), strict=True))
        full = full_gradient(net, lossfunc, x, y)
        expected.append({
            "grad_batch": [loop_grad_batch(net, lossfunc, yh, xh) for xh, yh in halves],
            "jacobian": [loop_jacobian(net, xh) for xh, _ in halves],
            "half_grad": [full_gradient(net, lossfunc, xh, yh) for xh, yh in halves],
            "grad": full,
        })
        with torch.no_grad():
            for name, p in trainable(net):
                p -= lr * full[name]
    return expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_sample_gradients_and_jacobians_under_ddp(variant, ddp_runs):
    """Each rank's p.grad_batch and p.jacobian are those of its half alone; p.grad after DDP's
    all-reduce is the full batch's gradient; the same holds in the second iteration (after an
    SGD step, DDP's bucket rebuild, and the static graph's first-iteration special case)."""
    expected = _ddp_references(make_net(unused=VARIANTS[variant]["unused"]), BATCHES, LR)
    found = ddp_runs[variant]
    for it, exp in enumerate(expected):
        assert differ(*exp["half_grad"]), "the halves must differ, or the all-reduce is not tested"
        for rank in range(WORLD):
            got = found[rank][it]
            assert_all_close(got["grad_batch"], exp["grad_batch"][rank], f"iteration {it} rank {rank} grad_batch")
            assert_all_close(got["jacobian"], exp["jacobian"][rank], f"iteration {it} rank {rank} jacobian")
            grads = dict(got["grad"])
            for name in [k for k in grads if k.startswith("unused.")]:
                # jacext gives the unused module zeros (checked above); DDP leaves its grad at None
                assert grads.pop(name) is None and not exp["grad"][name].any(), name
            expected_grads = {k: v for k, v in exp["grad"].items() if k in grads}
            assert_all_close(grads, expected_grads, f"iteration {it} rank {rank} p.grad")


# ---------------------------------------------------------------- 2. DP-SGD under DDP


def _dp_task(rank, state, x, y, sizes, max_norm, lr, sigma, seed, reduction, options):
    """ClipGrad under DDP: this rank's clipped sum without syncing, then synced, then two DPSGD
    steps (noise-free, then seeded noise, the same generator on every rank)."""
    model = DDP(jacext.extend(make_net(state)), **options)
    lossfunc = nn.CrossEntropyLoss(reduction=reduction)
    x, y = x.split(sizes)[rank], y.split(sizes)[rank]
    params = trainable(model.module)
    found = {}
    with model.no_sync(), backpack(ClipGrad(max_norm, loss_reduction=reduction)):
        lossfunc(model(x), y).backward()
    found["local"] = {name: p.grad.clone() for name, p in params}
    found["per_sample_l2"] = {name: p.per_sample_l2.clone() for name, p in params}
    for step, noise in enumerate([0.0, sigma]):
        model.zero_grad()
        with backpack(ClipGrad(max_norm, loss_reduction=reduction)):
            lossfunc(model(x), y).backward()
        for _, p in params:
            p.grad.mul_(WORLD)  # DDP averages over ranks; ClipGrad and DPSGD work with the sum
        found[f"synced{step}"] = {name: p.grad.clone() for name, p in params}
        generator = torch.Generator().manual_seed(seed)
        DPSGD(
            model.parameters(),
            lr=lr,
            noise_multiplier=noise,
            max_grad_norm=max_norm,
            expected_batch_size=sum(sizes),
            generator=generator,
        ).step()
        found[f"params{step}"] = {name: p.detach().clone() for name, p in params}
    return found


def _clipped_sum(net, x, y, max_norm):
    """Oracle: sum over samples of min(1, C / (||g_n|| + 1e-6)) g_n; also the squared norms."""
    if not len(x):
        params = trainable(net)
        return {k: torch.zeros_like(p) for k, p in params}, {k: x.new_zeros(0) for k, _ in params}, x.new_zeros(0)
    per_sample = loop_grad_batch(net, nn.CrossEntropyLoss(reduction="sum"), y, x)
    sq = {k: g.flatten(1).square().sum(1) for k, g in per_sample.items()}
    w = (max_norm / (torch.stack(list(sq.values())).sum(0).sqrt() + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("n,n...->...", w, g) for k, g in per_sample.items()}, sq, w


DP: dict[str, Any] = dict(max_norm=3.0, lr=0.3, sigma=1.0, seed=7)
DP_CASES = {  # loss reduction, shard sizes (unequal, as Poisson sampling gives), DDP's options
    "sum": dict(reduction="sum", sizes=(4, 3), options={}),
    "mean-find_unused_parameters": dict(reduction="mean", sizes=(4, 3), options=dict(find_unused_parameters=True)),
    "empty-shard": dict(reduction="sum", sizes=(7, 0), options={}),
}


def _dp_batch(sizes):
    return make_batch(sum(sizes), seed=3)


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    cases = {}
    for name, case in DP_CASES.items():
        x, y = _dp_batch(case["sizes"])
        cases[name] = dict(state=make_net().state_dict(), x=x, y=y, **case, **DP)
    return run_ranks(_dp_task, tmp_path_factory.mktemp("dp"), cases)


@pytest.mark.parametrize("case", DP_CASES)
def test_dpsgd_under_ddp_equals_single_process(case, dp_runs):
    """Each rank's p.grad is its shard's clipped sum (unequal shards, as Poisson sampling gives);
    DDP's average times the world size is the full batch's clipped sum; DPSGD steps then give
    the single-process parameters, noise-free and with the same seeded noise on every rank."""
    sizes, (x, y), net, found = DP_CASES[case]["sizes"], _dp_batch(DP_CASES[case]["sizes"]), make_net(), dp_runs[case]
    max_norm, lr, sigma, seed = DP["max_norm"], DP["lr"], DP["sigma"], DP["seed"]

    shards = list(zip(x.split(sizes), y.split(sizes), strict=True))
    _, _, w = _clipped_sum(net, x, y, max_norm)
    assert (w < 1).any() and (w == 1).any(), "the data should clip some samples and not others"
    locals_ = []
    for rank, (xs, ys) in enumerate(shards):
        local, sq, _ = _clipped_sum(net, xs, ys, max_norm)
        locals_.append(local)
        assert_all_close(found[rank]["local"], local, f"rank {rank} clipped sum of its shard")
        assert_all_close(found[rank]["per_sample_l2"], sq, f"rank {rank} per_sample_l2")
    assert differ(*locals_), "the shards' clipped sums must differ, or the all-reduce is not tested"

    reference = make_net(net.state_dict())
    for step, noise in enumerate([0.0, sigma]):
        expected, _, _ = _clipped_sum(reference, x, y, max_norm)
        for name, p in trainable(reference):
            p.grad = expected[name].clone()
        before = {name: p.detach().clone() for name, p in trainable(reference)}
        generator = torch.Generator().manual_seed(seed)
        optimizer = DPSGD(
            reference.parameters(),
            lr=lr,
            noise_multiplier=noise,
            max_grad_norm=max_norm,
            expected_batch_size=len(x),
            generator=generator,
        )
        optimizer.privatise()  # what step() does after refusing gradients not clipped (set by hand here)
        torch.optim.SGD.step(optimizer)
        after = {name: p.detach().clone() for name, p in trainable(reference)}
        if noise:
            noiseless = {k: before[k] - lr * expected[k] / len(x) for k in before}
            assert differ(after, noiseless), "the noise must change the step"
        for rank in range(WORLD):
            assert_all_close(found[rank][f"synced{step}"], expected, f"step {step} rank {rank} all-reduced clipped sum")
            assert_all_close(found[rank][f"params{step}"], after, f"step {step} rank {rank} parameters after DPSGD")


# ---------------------------------------------------------------- 3. NTK blocks across ranks


def _ntk_task(rank, state, x):
    """This rank's Jacobian (jacext.jacobian through DDP), all-gathered; its row of kernel
    blocks J_rank J_s^T; the rows all-gathered into the full kernel (N, C, N, C)."""
    model = DDP(make_net(state))
    J = jacext.jacobian(model, x.chunk(WORLD)[rank], flat=True)  # (N / WORLD, C, P)
    Js = [torch.empty_like(J) for _ in range(WORLD)]
    dist.all_gather(Js, J)
    row = torch.einsum("ncp,mdp->ncmd", J, torch.cat(Js))
    rows = [torch.empty_like(row) for _ in range(WORLD)]
    dist.all_gather(rows, row)
    return torch.cat(rows)


def test_ntk_blocks_gathered_across_ranks(tmp_path):
    """The kernel gathered from both ranks' blocks equals the single-process kernel J J^T."""
    net, (x, _) = make_net(), make_batch(6, seed=4)
    jac = loop_jacobian(net, x)
    J = torch.cat([j.flatten(2) for j in jac.values()], dim=2)  # model.parameters() order
    expected = torch.einsum("ncp,mdp->ncmd", J, J)
    for rank, kernel in enumerate(run_ranks(_ntk_task, tmp_path, {"ntk": dict(state=net.state_dict(), x=x)})["ntk"]):
        assert_close(kernel, expected, F64, f"rank {rank} NTK")


# ---------------------------------------------------------------- known problems


@pytest.fixture
def one_rank_group():
    """A one-process gloo group in this process (DDP needs a group), destroyed afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_jacobian_through_ddp_keeps_the_inner_model_extended(one_rank_group):
    """jacext.jacobian(DDP(extended net)) must leave net extended for the next training step."""
    net, (x, y) = make_net(), make_batch(4, seed=5)
    model = DDP(jacext.extend(net))
    jacext.jacobian(model, x)
    with backpack(jacext.BatchGrad()):
        nn.CrossEntropyLoss()(model(x), y).backward()
    assert_all_close(
        {name: p.grad_batch for name, p in trainable(net)},
        loop_grad_batch(make_net(net.state_dict()), nn.CrossEntropyLoss(), y, x),
        "grad_batch after jacext.jacobian",
    )


def test_syncbatchnorm_with_batch_statistics_is_refused_or_exact():
    """Outside a process group SyncBatchNorm is BatchNorm; jacext must refuse it like BatchNorm
    (default batchnorm='error') or differentiate it exactly, never return other numbers."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(2, 3, 2), nn.SyncBatchNorm(3, track_running_stats=False), nn.Flatten(), nn.Linear(9, 2)
    ).to(F64)
    x = torch.randn(5, 2, 4, dtype=F64)
    expected = loop_jacobian(net, x)
    jacext.extend(net)
    try:
        with backpack(jacext.BatchJacobian()):
            out = net(x)
            out.backward(torch.ones_like(out))
    except jacext.JacextError:
        return
    assert_all_close({name: p.jacobian for name, p in trainable(net)}, expected, "SyncBatchNorm Jacobian")
