"""DenseBlock and Transition inside one's own architecture: an FC-DenseNet (Tiramisu) style segmentation net."""

import torch
from torch import nn
from torchvision.models.densenet import _DenseBlock as TorchvisionBlock
from torchvision.models.densenet import _Transition as TorchvisionTransition
from helpers import assert_lockstep

import densenet_fused


class Tiramisu(nn.Module):
    """Down: dense block -> transition; middle dense block; up: transposed conv of the middle block's new
    channels, then a dense block over [upsampled, skip] (a list: copied into its buffer, no torch.cat)."""

    def __init__(self, block=densenet_fused.DenseBlock, transition=densenet_fused.Transition, concat=False):
        super().__init__()
        self.concat = concat
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.down = block(num_layers=2, num_input_features=8, bn_size=2, growth_rate=4, drop_rate=0.0)
        self.pool = transition(16, 8)
        self.middle = block(num_layers=2, num_input_features=8, bn_size=2, growth_rate=4, drop_rate=0.0)
        self.up = nn.ConvTranspose2d(8, 8, kernel_size=2, stride=2, bias=False)
        self.decode = block(num_layers=2, num_input_features=24, bn_size=2, growth_rate=4, drop_rate=0.0)
        self.head = nn.Conv2d(32, 3, 1)

    def forward(self, x):
        skip = self.down(self.stem(x))
        middle = self.middle(self.pool(skip))
        up = self.up(middle[:, 8:])  # only the middle block's new channels go up, as in FC-DenseNet
        return self.head(self.decode(torch.cat([up, skip], 1) if self.concat else [up, skip]))


def test_tiramisu_matches_torchvision_blocks_with_concatenation():
    torch.manual_seed(0)
    ours = Tiramisu().double()
    theirs = Tiramisu(TorchvisionBlock, TorchvisionTransition, concat=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 16, 18, dtype=torch.float64)
    target = torch.randint(3, (2, 16, 18))  # per-pixel classes
    assert_lockstep(ours, theirs, x, target, steps=2, rtol=1e-9, atol=1e-9)
