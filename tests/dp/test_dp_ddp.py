"""PrivacyEngine under DistributedDataParallel (gloo, 2 processes, CPU) equals one process with
the same global batches: gradients averaged by DDP and multiplied back, the noise drawn once from
one generator state (rank 0's, broadcast: rank 1 is given another seed on purpose), adaptive
clipping's count summed over the ranks, the accounting of the global batch."""

import datetime
import os
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dp_cases import ADAPTIVE, FILTERS, make_model
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

pytestmark = [pytest.mark.filterwarnings(f) for f in FILTERS] + [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend"),
]
pytest.importorskip("opacus")

WORLD, SAMPLES, EPOCHS = 2, 16, 2
CASES = {
    "flat-mean": dict(clipping="flat", reduction="mean"),
    "flat-sum": dict(clipping="flat", reduction="sum"),
    "per_layer-mean": dict(clipping="per_layer", reduction="mean"),
    "adaptive-mean": dict(clipping="adaptive", reduction="mean"),
}


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SAMPLES, 5, dtype=torch.float64, generator=g) * 3
    return TensorDataset(x, torch.randint(0, 3, (SAMPLES,), generator=g))


def train(loader, clipping, reduction, seed, ddp=False):
    """The training script; under DDP each process runs it on its shard."""
    from jacext.dp import PrivacyEngine

    model = make_model("mlp")
    module = nn.parallel.DistributedDataParallel(model) if ddp else model
    bound = [1.0, 0.5, 1.0, 0.3] if clipping == "per_layer" else 1.5
    extra = ADAPTIVE if clipping == "adaptive" else {}
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, loader = engine.make_private(
            module=module, optimizer=torch.optim.SGD(model.parameters(), lr=0.3), data_loader=loader,
            noise_multiplier=0.9, max_grad_norm=bound, clipping=clipping, loss_reduction=reduction,
            poisson_sampling=False, noise_generator=torch.Generator().manual_seed(seed), **extra,
        )
    lossfunc = nn.CrossEntropyLoss(reduction=reduction)
    for _ in range(EPOCHS):
        for x, y in loader:
            opt.zero_grad()
            lossfunc(private(x), y).backward()
            opt.step()
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "epsilon": engine.get_epsilon(1e-5),
        "max_grad_norm": float(opt.max_grad_norm),
    }


def _task(rank, clipping, reduction):
    ds = data()
    sampler = DistributedSampler(ds, WORLD, rank, shuffle=False)
    loader = DataLoader(ds, batch_size=SAMPLES // (2 * WORLD), sampler=sampler)
    return train(loader, clipping, reduction, seed=5 + rank, ddp=True)


def _worker(rank, port, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cases = torch.load(os.path.join(folder, "cases.pt"))
        results = {name: _task(rank, **case) for name, case in cases.items()}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(folder, f"result{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp_ddp")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
            env.setenv("GLOO_SOCKET_IFNAME", "lo")
        torch.save(CASES, folder / "cases.pt")
        mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"result{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("case", CASES)
def test_ddp_equals_one_process(case, runs):
    # the global batches of the two shards (indices r, r + 2, ...) are one process's batches of 8
    single = train(DataLoader(data(), batch_size=SAMPLES // WORLD, shuffle=False), seed=5, **CASES[case])
    for rank in range(WORLD):
        got = runs[rank][case]
        for k, p in single["params"].items():
            torch.testing.assert_close(got["params"][k], p, rtol=1e-10, atol=1e-12, msg=f"rank {rank} {k}")
        assert got["epsilon"] == single["epsilon"]
        assert got["max_grad_norm"] == pytest.approx(single["max_grad_norm"], rel=1e-12)
    if case.startswith("adaptive"):
        assert single["max_grad_norm"] != 1.5
