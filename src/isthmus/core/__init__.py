"""Pure data and maths shared by every face of isthmus. No I/O, no clock, no global randomness."""

from isthmus.core.errors import ConfigError, IsthmusError, RegistryError, TraceError, UnknownProfileError
from isthmus.core.hashing import DEFAULT_BLOCK_SIZE, ROOT_HASH, expand_coarse_hash_ids, hash_token_blocks
from isthmus.core.instance import InstanceSpec
from isthmus.core.perf import (
    GPUS,
    MODELS,
    GpuSpec,
    ModelSpec,
    PerfModel,
    RooflinePerfModel,
    builtin_perf_model,
    gpu_spec,
    model_spec,
)
from isthmus.core.policy import HOLD, CostBreakdown, Decision, Outcome, Policy, PolicyFactory, PolicyRegistry
from isthmus.core.request import SLO, Request
from isthmus.core.snapshot import (
    CallbackPrefixView,
    ClusterSnapshot,
    InstanceView,
    NoPrefixInfo,
    PrefixIndex,
    PrefixIndexView,
)
from isthmus.core.topology import Topology

__all__ = [
    "DEFAULT_BLOCK_SIZE", "GPUS", "HOLD", "MODELS", "ROOT_HASH", "SLO", "CallbackPrefixView",
    "ClusterSnapshot", "ConfigError", "CostBreakdown", "Decision", "GpuSpec", "InstanceSpec", "InstanceView",
    "IsthmusError", "ModelSpec", "NoPrefixInfo", "Outcome", "PerfModel", "Policy", "PolicyFactory",
    "PolicyRegistry", "PrefixIndex", "PrefixIndexView", "RegistryError", "Request", "RooflinePerfModel",
    "Topology", "TraceError", "UnknownProfileError", "builtin_perf_model", "expand_coarse_hash_ids",
    "gpu_spec", "hash_token_blocks", "model_spec",
]
