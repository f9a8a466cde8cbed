"""Two CPU processes over gloo: DistributedDataParallel with the fused blocks, and SyncBatchNorm inside them.

torch.nn.SyncBatchNorm refuses CPU tensors (and DDP refuses SyncBatchNorm modules on CPU), so the reference
for a SyncBatchNorm run is its definition: the same network built from torchvision's blocks, trained in
one process on the whole global batch; there each rank averages its gradients with an all-reduce, as DDP
does on GPUs.  The local-BatchNorm DDP run is compared with torchvision normalizing each rank's part alone.
"""

import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchvision.models.densenet import _DenseBlock as TorchvisionBlock
from torchvision.models.densenet import _Transition as TorchvisionTransition
from helpers import randomize_affine

import densenet_fused

WORLD = 2
BATCHES = (3, 2)  # per rank: unequal on purpose, the global count must be all-reduced
CLASSES = 4
STEPS = 2


PRELU = (partial(densenet_fused.DenseBlock, act="prelu"), partial(densenet_fused.Transition, act="prelu"))


def _network(block, transition):
    """A small classifier made of dense blocks and a transition only (no BatchNorm outside them)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        block(2, 6, 2, 3, 0.0),
        transition(12, 6),
        block(2, 6, 2, 3, 0.0),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, CLASSES),
    )
    return randomize_affine(net.double())


def _data():
    torch.manual_seed(1)
    x = torch.randn(sum(BATCHES), 3, 9, 10, dtype=torch.float64)
    return x, torch.randint(CLASSES, (sum(BATCHES),))


def _loss(out, target):
    """Each rank's share of the global-batch mean, times WORLD (DDP divides the summed gradients by WORLD)."""
    return F.cross_entropy(out, target, reduction="sum") * WORLD / sum(BATCHES)


def _train(model, net, x, target, steps, average):
    """``steps`` SGD steps of ``model`` (``net`` or its DDP wrapper) on this rank's data."""
    params, record = list(net.parameters()), []
    for _ in range(steps):
        x_step = x.clone().requires_grad_()
        for p in params:
            p.grad = None
        out = model(x_step)
        _loss(out, target).backward()
        if average:  # what DDP does to the gradients
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        record.append((out.detach(), x_step.grad, [p.grad.clone() for p in params]))
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
    return {"steps": record, "state": {key: value.clone() for key, value in net.state_dict().items()}}


def _all_reduce_sizes(run):
    """The number of elements of each all_reduce that ``run`` issues."""
    real, sizes = dist.all_reduce, []

    def recording(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        run()
    finally:
        dist.all_reduce = real
    return sizes


def _worker(rank, port, folder, steps):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, target = _data()
        start = sum(BATCHES[:rank])
        x, target = x[start : start + BATCHES[rank]], target[start : start + BATCHES[rank]]
        net = _network(densenet_fused.DenseBlock, densenet_fused.Transition)
        ddp = _train(nn.parallel.DistributedDataParallel(net), net, x, target, steps, average=False)
        net = nn.SyncBatchNorm.convert_sync_batchnorm(_network(densenet_fused.DenseBlock, densenet_fused.Transition))
        sync = _train(net, net, x, target, steps, average=True)
        prelu = nn.SyncBatchNorm.convert_sync_batchnorm(_network(*PRELU))
        sync_prelu = _train(prelu, prelu, x, target, steps, average=True)
        reduced = _all_reduce_sizes(lambda: net(x).sum().backward())
        net[1].denselayer2.norm2 = nn.BatchNorm2d(6).double()  # one local norm among synchronized ones
        try:
            net(x)
            mixed = ""
        except ValueError as error:
            mixed = str(error)
        double = []
        for module, channels in ((net[2], 12), (net[3], 6)):  # a synchronized transition, then block
            x_step = torch.randn(2, channels, 6, 6, dtype=torch.float64, requires_grad=True)
            try:
                torch.autograd.grad(module(x_step).square().sum(), x_step, create_graph=True)
                double.append("")
            except RuntimeError as error:
                double.append(str(error))
        torch.save(
            {"ddp": ddp, "sync": sync, "sync_prelu": sync_prelu, "mixed": mixed, "reduced": reduced, "double": double},
            folder / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs, done once by two spawned processes: {"ddp" | "sync" | "mixed": [rank 0, rank 1]}."""
    folder = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), folder, STEPS), nprocs=WORLD, join=True)
    ranks = [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    return {key: [rank[key] for rank in ranks] for key in ranks[0]}


def _reference(steps, per_rank, modules=(TorchvisionBlock, TorchvisionTransition)):
    """torchvision's blocks (or ``modules``) in one process: on the global batch (SyncBatchNorm) or on each
    rank's part."""
    net = _network(*modules)
    x, target = _data()
    record = []
    for _ in range(steps):
        x_step = x.clone().requires_grad_()
        net.zero_grad()
        if per_rank:  # local statistics, rank by rank; DDP keeps rank 0's running stats (broadcast_buffers)
            scratch = {name: b.clone() for name, b in net.named_buffers()}  # rank 1's updates: discarded
            out_rank1 = torch.func.functional_call(net, scratch, (x_step[BATCHES[0] :],))
            out = torch.cat([net(x_step[: BATCHES[0]]), out_rank1])
        else:
            out = net(x_step)
        (F.cross_entropy(out, target, reduction="sum") / sum(BATCHES)).backward()
        record.append((out.detach(), x_step.grad, [p.grad.clone() for p in net.parameters()]))
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.1 * p.grad
    return record, net.state_dict()


def _assert_matches(ranks, reference):
    record, state = reference
    for step, (out, grad_x, grads) in enumerate(record):
        steps = [rank["steps"][step] for rank in ranks]
        close = dict(rtol=1e-9, atol=1e-10)
        outputs = torch.cat([s[0] for s in steps])
        torch.testing.assert_close(outputs, out, **close, msg=lambda m: f"step {step} output: {m}")
        # each rank's input gradient is that of its own loss, which is WORLD times its share of the mean
        grad_x_ranks = torch.cat([s[1] for s in steps]) / WORLD
        torch.testing.assert_close(grad_x_ranks, grad_x, **close, msg=lambda m: f"step {step} input grad: {m}")
        for rank_step in steps:  # DDP averaged the parameter gradients: every rank holds the same ones
            for i, (g, expected) in enumerate(zip(rank_step[2], grads)):
                torch.testing.assert_close(g, expected, **close, msg=lambda m: f"step {step} param grad {i}: {m}")
    for key, value in state.items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-9, atol=1e-10, msg=key)


def test_ddp_with_fused_blocks_matches_torchvision_per_rank(runs):
    _assert_matches(runs["ddp"], _reference(STEPS, per_rank=True))


def test_sync_batchnorm_in_fused_blocks_equals_global_batch_norm(runs):
    _assert_matches(runs["sync"], _reference(STEPS, per_rank=False))


def test_sync_batchnorm_with_prelu_equals_global_batch_norm(runs):
    """PReLU blocks and transitions (two calls of each kernel, the sync hook on their summed gradients) against
    the same PReLU network normalizing the global batch in one process (checked against MONAI's in
    tests/test_prelu.py)."""
    _assert_matches(runs["sync_prelu"], _reference(STEPS, per_rank=False, modules=PRELU))


def test_statistics_of_each_new_channel_are_reduced_once(runs):
    """Forward: the count once per block, sum and sum of squares of the input channels, then per layer of its
    bottleneck (bn_size * k = 6) and its k = 3 new channels, never a whole prefix.  Backward: per layer the
    sum dy and sum dy * x_hat of norm2 (6 channels) and norm1 (its whole input, as each norm1 has its own)."""
    block_forward = [1, 2 * 6, 2 * 6, 2 * 3, 2 * 6, 2 * 3]
    forward = block_forward + [1, 2 * 12] + block_forward  # block, transition (12 channels), block
    block_backward = [2 * 6, 2 * 9, 2 * 6, 2 * 6]  # layer 2 (norm2, norm1 over 9), layer 1 (norm2, norm1 over 6)
    backward = block_backward + [2 * 12] + block_backward
    assert runs["reduced"] == [forward + backward] * WORLD


def test_mixing_synchronized_and_local_norms_in_one_block_raises(runs):
    for message in runs["mixed"]:
        assert "must all be SyncBatchNorm over the same process group, or none of them" in message


def test_double_backward_through_synchronized_norms_raises_clearly(runs):
    for messages in runs["double"]:
        assert len(messages) == 2
        for what, message in zip(("transition", "dense block"), messages):
            assert f"double backward (create_graph=True) through a {what} with synchronized BatchNorms" in message
            assert "local BatchNorms" in message
