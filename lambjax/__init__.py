"""lambjax: large-batch optimizers (LAMB, LARS, AdamWDL) for JAX and optax."""

from lambjax import paddle as paddle
from lambjax import schedules as schedules
from lambjax._src.accumulation import AccumulationState as AccumulationState
from lambjax._src.accumulation import (
  accumulate_gradients as accumulate_gradients,
)
from lambjax._src.alias import adam as adam
from lambjax._src.alias import adamw as adamw
from lambjax._src.alias import adamw_dl as adamw_dl
from lambjax._src.alias import lamb as lamb
from lambjax._src.alias import lars as lars
from lambjax._src.alias import layerwise_lr_decay as layerwise_lr_decay
from lambjax._src.clipping import clip_by_global_norm as clip_by_global_norm
from lambjax._src.clipping import clip_by_norm as clip_by_norm
from lambjax._src.clipping import clip_by_value as clip_by_value
from lambjax._src.diagnostics import DiagnosticsState as DiagnosticsState
from lambjax._src.diagnostics import diagnostics as diagnostics
from lambjax._src.diagnostics import with_diagnostics as with_diagnostics
from lambjax._src.faults import apply_if_finite as apply_if_finite
from lambjax._src.fused import WorkspaceState as WorkspaceState
from lambjax._src.grouping import GroupedState as GroupedState
from lambjax._src.lr import get_lr as get_lr
from lambjax._src.lr import set_lr as set_lr
from lambjax._src.names import mask_by_name as mask_by_name
from lambjax._src.names import tree_names as tree_names
from lambjax._src.packing import PackedState as PackedState
from lambjax._src.packing import unpack_state as unpack_state
from lambjax._src.packing import with_packed_state as with_packed_state
from lambjax._src.quantized import QuantizedAdamState as QuantizedAdamState
from lambjax._src.quantized import QuantizedTensor as QuantizedTensor
from lambjax._src.quantized import QuantizedTraceState as QuantizedTraceState
from lambjax._src.quantized import scale_by_adam_8bit as scale_by_adam_8bit
from lambjax._src.quantized import state_bytes as state_bytes
from lambjax._src.quantized import trace_8bit as trace_8bit
from lambjax._src.sharding import state_sharding as state_sharding
from lambjax._src.stacking import Stacked as Stacked
from lambjax._src.state_io import from_bytes as from_bytes
from lambjax._src.state_io import load_state as load_state
from lambjax._src.state_io import load_state_dict as load_state_dict
from lambjax._src.state_io import save_state as save_state
from lambjax._src.state_io import state_dict as state_dict
from lambjax._src.state_io import to_bytes as to_bytes
from lambjax._src.transform import (
  InjectedLearningRateState as InjectedLearningRateState,
)
from lambjax._src.transform import LearningRateState as LearningRateState
from lambjax._src.transform import (
  ScheduledLearningRateState as ScheduledLearningRateState,
)
from lambjax._src.transform import TrustRatioState as TrustRatioState
from lambjax._src.transform import add_decayed_weights as add_decayed_weights
from lambjax._src.transform import scale_by_adam as scale_by_adam
from lambjax._src.transform import (
  scale_by_learning_rate as scale_by_learning_rate,
)
from lambjax._src.transform import scale_by_lr_ratio as scale_by_lr_ratio
from lambjax._src.transform import scale_by_trust_ratio as scale_by_trust_ratio
from lambjax._src.wrappers import MasterWeightsState as MasterWeightsState
from lambjax._src.wrappers import lazy_rows as lazy_rows
from lambjax._src.wrappers import with_master_weights as with_master_weights

__version__ = '0.1.0'
