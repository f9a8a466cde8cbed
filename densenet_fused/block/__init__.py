"""The shared-buffer dense block (Pleiss et al. 2017), its layers and the fused transition.

Module names, parameters and initialization follow torchvision's densenet.py exactly; only the
forward passes differ.  A block forward allocates one feature buffer [N, C0 + L*k, *spatial]; layer l
reads the prefix ``buf[:, :C_l]`` and writes its k new channels into ``buf[:, C_l:C_l + k]``.  The
batch statistics of a channel are computed once, when it is written.  Backward saves only the buffer
and the statistics, recomputes each layer's BN -> ReLU -> 1x1 conv, and adds every layer's input
gradient into one shared gradient buffer: the incoming gradient itself where nothing else can see it.

One job per file:

* ``modules``: the nn.Modules (torchvision's names and init) and the fused transition;
* ``forward``: from a block's modules to one call of the block op, and the running-statistics update;
* ``inputs``: input checks, the autocast dtype, and a norm's statistics for the fused ends;
* ``plan``: what each layer does in one forward (``LayerPlan``), packed into the op's arguments;
* ``ops``: the two custom ops, ``dense_block`` and ``dense_block_backward`` (the layer loops);
* ``autograd``: their autograd, the in-place gradient and the differentiable (double) backward;
* ``unfused``: when the modules run as torchvision's instead (hooks inside, empty batches, torch.func), and how.

The whole block is one custom op, so torch.compile sees it as opaque: the buffer, its slices and the
in-place gradient accumulation are the op's own business.
"""

from .inputs import norm_inputs
from .forward import dense_layers_forward
from .modules import DenseBlock, DenseLayer, LayerTypes, Transition, layer_types, norm_factory

__all__ = ["DenseBlock", "DenseLayer", "LayerTypes", "Transition", "dense_layers_forward", "layer_types", "norm_factory", "norm_inputs"]
