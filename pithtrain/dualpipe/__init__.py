"""The pipeline engine: stage records, per-layer stage execution and the DualPipeV schedule."""

from pithtrain.dualpipe.comm import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from pithtrain.dualpipe.dualpipev import DualPipeV
from pithtrain.dualpipe.utils import WeightGradStore

__all__ = ["DualPipeV", "WeightGradStore", "set_p2p_tensor_dtype", "set_p2p_tensor_shapes"]
