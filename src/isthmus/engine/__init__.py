"""One serving replica: KV block pool with prefix caching and a vLLM-v1-like scheduler."""

from isthmus.engine.kv_cache import BlockPool
from isthmus.engine.replica import FinishedRequest, Replica, ReplicaStats, StepResult

__all__ = ["BlockPool", "FinishedRequest", "Replica", "ReplicaStats", "StepResult"]
