"""timm's DenseNet after ``densenet_fused.convert``: the same model, whose ``set_grad_checkpointing`` switches the
fused layers' ``memory_efficient`` (timm's own only finds timm's DenseLayer).  Imported only with timm."""

import torch
from timm.models import densenet as timm_densenet

from .block.modules import _DenseLayer


class DenseNet(timm_densenet.DenseNet):
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute (True) or keep (False) each fused layer's bottleneck in backward, as timm's checkpointing."""
        for layer in self.features.modules():
            if isinstance(layer, _DenseLayer):
                layer.memory_efficient = enable
