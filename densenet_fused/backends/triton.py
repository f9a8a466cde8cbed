"""The layer kernels on Triton: each call launches the kernels of ``ops`` directly (no custom-op dispatch, no
torch op between them), with the statistics reduced where the data is produced and finalized on the device."""

from torch import Tensor

from ..ops._conv1x1_triton import conv1x1_backward_triton, conv1x1_forward_triton
from ..ops._norm_args import NormArgs
from ..ops.bn_relu import bn_relu_backward_launch, bn_relu_launch
from ..ops.channel_stats import stats_pass
from ..ops.layout import empty_like_layout


class TritonKernels:
    """``backends.LayerKernels`` for batch statistics of this process on tensors the Triton kernels take."""

    def copy(self, src, dst, stats=None, keep=None, drop_scale: float = 1.0) -> None:
        stats_pass(src, dst, keep, drop_scale, stats)

    def conv1x1(self, x, norm: NormArgs, weight, stats=None) -> Tensor:
        return conv1x1_forward_triton(x, norm, weight, empty_like_layout(x, weight.size(0)), pool=False, stats=stats)

    def bn_relu(self, x, norm: NormArgs) -> Tensor:
        return bn_relu_launch(x, norm)

    def bn_relu_backward(self, grad_z, x, norm: NormArgs, training: bool):
        return bn_relu_backward_launch(grad_z, x, norm, training)

    def conv1x1_backward(self, grad_y, x, norm: NormArgs, weight, grad_buffer, training: bool):
        grad_weight, grad_gamma, grad_beta = conv1x1_backward_triton(
            grad_y, x, norm, weight, grad_buffer[:, : x.size(1)], training, pool=False, accumulate=True
        )
        return grad_weight.view(weight.shape), grad_gamma, grad_beta
