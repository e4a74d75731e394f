"""The live router: an OpenAI-compatible proxy in front of engines in several regions.

- :mod:`.config`: the YAML configuration (one frozen pydantic model) and its loader;
- :mod:`.app`: the HTTP face and the request path (decide, call upstream, relay, retry);
- :mod:`.state`: what the router knows of replicas and peers, the snapshots its policy decides on,
  and the background collectors (metric scrapes, health and RTT probes, peer polls);
- :mod:`.hold`: requests held while the policy finds no target;
- :mod:`.reliability`: health, ejection, retry budget and backoff state machines;
- :mod:`.scrape`: vLLM / SGLang ``/metrics`` parsing; :mod:`.prompt`: request bodies to tokens and
  block hashes; :mod:`.metrics`: the router's own Prometheus metrics; :mod:`.errors`: OpenAI-style
  error answers; :mod:`.server` and :mod:`.cli`: ``isthmus serve``.
"""
