"""isthmus: route LLM inference across regions by network latency, queues and cached prefixes.

Layers (arrows point down only): ``core`` (pure data and maths) <- ``engine`` (one replica) and
``policies`` (routing decisions) <- shells: ``sim``, ``workloads`` readers, ``cli``.
"""

__version__ = "0.1.0"
