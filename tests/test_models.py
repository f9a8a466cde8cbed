"""Drop-in equivalence with torchvision's DenseNet: structure, init, weights, and training numerics."""

import copy
import io
import warnings

import pytest
import torch
import torchvision
from torchvision.models import densenet as tv
from helpers import TINY, assert_float32_as_accurate_as_torchvision, assert_lockstep, randomize_affine, twins

import densenet_fused

BUILDERS = ["densenet121", "densenet161", "densenet169", "densenet201"]


@pytest.mark.parametrize("name", BUILDERS)
def test_same_seed_gives_bit_identical_init_and_names(name):
    torch.manual_seed(3)
    ours = getattr(densenet_fused, name)()
    torch.manual_seed(3)
    theirs = getattr(torchvision.models, name)()
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key in ours_state:
        assert torch.equal(ours_state[key], theirs_state[key]), key


def test_densenet264_config():
    model = densenet_fused.densenet264(num_classes=10)
    blocks = [m for n, m in model.features.named_children() if n.startswith("denseblock")]
    assert [len(b) for b in blocks] == [6, 12, 64, 48]
    assert model.features.denseblock1.denselayer1.conv2.out_channels == 32
    assert model.classifier.in_features == 2688
    with pytest.raises(ValueError, match="no pretrained weights"):
        densenet_fused.densenet264(weights="IMAGENET1K_V1")


def test_constructor_arguments_match_torchvision():
    import inspect

    ours = inspect.signature(densenet_fused.DenseNet).parameters
    theirs = inspect.signature(torchvision.models.DenseNet).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    extra = list(ours)[len(theirs) :]  # our additions are keyword-only, with defaults
    assert extra == ["spatial_dims", "in_channels", "norm", "small_inputs", "channel_dropout", "act"]
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in extra)
    defaults = [ours[name].default for name in extra]
    assert defaults == [2, 3, "batch", False, False, "relu"]
    assert ours["memory_efficient"].default is True


def test_state_dict_loads_strictly_both_ways():
    ours, theirs = twins(**TINY)
    theirs2 = torchvision.models.DenseNet(**TINY)
    theirs2.load_state_dict(ours.state_dict(), strict=True)
    ours2 = densenet_fused.DenseNet(**TINY)
    ours2.load_state_dict(theirs.state_dict(), strict=True)
    for a, b in zip(ours2.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b.to(a.dtype))


# weights= and pretrained= through torchvision's loader and a torch.hub cache: tests/test_pretrained.py


def test_copy_save_and_load_round_trips():
    model, _ = twins(dtype=torch.float32, **TINY)
    x = torch.randn(2, 3, 35, 39)
    model.eval()
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = densenet_fused.DenseNet(**TINY).eval()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    clone.train()
    clone(x).sum().backward()  # the copy trains on its own ...
    assert model.features.conv0.weight.grad is None  # ... without touching the original


CONFIGS = {
    "tiny": (TINY, (2, 3, 35, 39), 3),
    "k5_bn3_odd": (dict(growth_rate=5, block_config=(3, 2, 2), num_init_features=6, bn_size=3, num_classes=4), (2, 3, 33, 47), 3),
    "k7_drop_free_batch2": (dict(growth_rate=7, block_config=(4, 3), num_init_features=10, bn_size=1, num_classes=3), (2, 3, 29, 31), 2),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_trains_like_torchvision_float64(name, memory_efficient):
    config, shape, steps = CONFIGS[name]
    ours, theirs = twins(**config, memory_efficient=memory_efficient)
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64)
    target = torch.randint(config["num_classes"], (shape[0],))
    assert_lockstep(ours, theirs, x, target, steps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("builder,shape", [("densenet121", (2, 3, 67, 71)), ("densenet161", (2, 3, 65, 65))])
def test_presets_train_like_torchvision_float64(builder, shape):
    torch.manual_seed(0)
    ours = getattr(densenet_fused, builder)(num_classes=6).double()
    theirs = getattr(torchvision.models, builder)(num_classes=6).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    target = torch.tensor([1, 4])
    assert_lockstep(ours, theirs, x, target, steps=2, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_is_as_accurate_as_torchvision(channels_last):
    """Float32 against the float64 truth: ours no further from it than torchvision's own float32."""

    def make(seed):
        ours, theirs = twins(dtype=torch.float32, seed=seed, **TINY)
        randomize_affine(ours)
        theirs.load_state_dict(ours.state_dict())
        torch.manual_seed(100 + seed)
        x = torch.randn(2, 3, 35, 39)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        target = torch.tensor([0, 3])
        return ours, theirs, x, lambda out: torch.nn.functional.cross_entropy(out, target)

    assert_float32_as_accurate_as_torchvision(make)


def test_momentum_none_cumulative_average():
    ours, theirs = twins(norm_kwargs=dict(momentum=None), **TINY)
    x = torch.randn(2, 3, 35, 39, dtype=torch.float64)
    assert_lockstep(ours, theirs, x, torch.tensor([1, 2]), steps=3, rtol=1e-9, atol=1e-9)
    assert int(ours.features.denseblock2.denselayer3.norm1.num_batches_tracked) == 3


@pytest.mark.parametrize(
    "norm_kwargs",
    [dict(momentum=0.3, eps=1e-3), dict(affine=False), dict(track_running_stats=False)],
    ids=["momentum_eps", "no_affine", "no_running_stats"],
)
def test_batchnorm_options(norm_kwargs):
    ours, theirs = twins(norm_kwargs=norm_kwargs, **TINY)
    x = torch.randn(2, 3, 35, 39, dtype=torch.float64)
    assert_lockstep(ours, theirs, x, torch.tensor([1, 2]), steps=2, rtol=1e-9, atol=1e-9)


def test_dropout_matches_torchvision_and_backward_uses_the_forward_mask():
    ours, theirs = twins(**{**TINY, "drop_rate": 0.4})
    x = torch.randn(2, 3, 35, 39, dtype=torch.float64)
    target = torch.tensor([1, 2])
    for step in range(2):
        torch.manual_seed(100 + step)
        out = ours(x)
        torch.nn.functional.cross_entropy(out, target).backward()
        torch.manual_seed(100 + step)
        out_t = theirs(x)
        torch.nn.functional.cross_entropy(out_t, target).backward()
        torch.testing.assert_close(out, out_t, rtol=1e-9, atol=1e-9)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)  # no dropout in eval


def test_eval_mode_backward_matches_torchvision():
    """Fine-tuning with frozen BatchNorm: eval-mode statistics, gradients still flow."""
    ours, theirs = twins(**TINY)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 35, 39, dtype=torch.float64)
    from helpers import train_step

    out, gx, grads = train_step(ours, x, torch.tensor([0, 1]))
    out_t, gx_t, grads_t = train_step(theirs, x, torch.tensor([0, 1]))
    torch.testing.assert_close(out, out_t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx, gx_t, rtol=1e-9, atol=1e-9)
    for g, g_t in zip(grads, grads_t):
        torch.testing.assert_close(g, g_t, rtol=1e-9, atol=1e-9)


def test_batch_one_at_normal_size_trains_like_torchvision():
    ours, theirs = twins(**TINY)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert_lockstep(ours, theirs, x, torch.tensor([2]), steps=2, rtol=1e-9, atol=1e-9)


def test_channels_last_input_matches_contiguous():
    model, _ = twins(**TINY)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 35, 39, dtype=torch.float64)
    out = model(x)
    out.sum().backward()
    out_cl = twin(x.to(memory_format=torch.channels_last))
    out_cl.sum().backward()
    buf = twin.features.denseblock1(twin.features[:4](x.to(memory_format=torch.channels_last)))
    assert buf.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out, rtol=1e-10, atol=1e-10)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10)


def _warnings_and_weights(builder, monkeypatch, **kwargs):
    """The warnings a builder emits and the weights it asks torchvision's loader for (no download)."""
    loaded = []
    monkeypatch.setattr(tv, "_load_state_dict", lambda model, weights, progress: loaded.append(weights))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        builder(**kwargs)
    return [str(w.message) for w in caught], loaded


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
@pytest.mark.parametrize("pretrained", [True, False])
def test_legacy_pretrained_keyword_behaves_as_torchvision(name, pretrained, monkeypatch):
    ours = _warnings_and_weights(getattr(densenet_fused, name), monkeypatch, pretrained=pretrained)
    theirs = _warnings_and_weights(getattr(torchvision.models, name), monkeypatch, pretrained=pretrained)
    assert ours == theirs
    assert ours[1] == ([getattr(tv, f"DenseNet{name[8:]}_Weights").IMAGENET1K_V1] if pretrained else [])
    assert any("'pretrained' is deprecated" in message for message in ours[0])


def test_densenet264_has_no_pretrained_weights(monkeypatch):
    with pytest.raises(ValueError, match="No weights available for model densenet264"):
        densenet_fused.densenet264(pretrained=True)
    messages, loaded = _warnings_and_weights(densenet_fused.densenet264, monkeypatch, pretrained=False)
    assert loaded == [] and any("'pretrained' is deprecated" in message for message in messages)
