"""Write expect/ModelTester.test_<builder>_expect.pkl from unmodified torchvision, as torchvision's own
test_classification_model records them (seed 0, num_classes=50, eval, one torch.rand(1, 3, 224, 224) input).

densenet264, which torchvision has no builder for, is torchvision's DenseNet(32, (6, 12, 64, 48), 64).
Run: python tests/peer/make_torchvision_expect.py
"""

import functools
import os

import torch
import torchvision
from peer_utils import set_rng_seed

BUILDERS = {
    "densenet121": torchvision.models.densenet121,
    "densenet161": torchvision.models.densenet161,
    "densenet169": torchvision.models.densenet169,
    "densenet201": torchvision.models.densenet201,
    "densenet264": functools.partial(torchvision.models.DenseNet, 32, (6, 12, 64, 48), 64),
}


def main() -> None:
    expect_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expect")
    for name, builder in BUILDERS.items():
        set_rng_seed(0)
        model = builder(num_classes=50).eval()
        x = torch.rand(1, 3, 224, 224)
        with torch.no_grad():
            out = model(x)
        torch.save(out, os.path.join(expect_dir, f"ModelTester.test_{name}_expect.pkl"))
        print(name, tuple(out.shape))


if __name__ == "__main__":
    main()
