"""A vLLM-compatible engine double: the engine model served over HTTP in wall-clock time.

``isthmus emulate`` starts one process that speaks vLLM's OpenAI API and exposes vLLM's metrics and
KV events, but has no GPU and no model: a real continuous-batching scheduler and prefix cache
(:class:`isthmus.engine.Replica`) decide every step, each step lasts what the performance model says
(times ``--time-scale``), and the generated text is filler words. It is what the router's tests, the
demos and the multi-region testbed run instead of GPUs.

Start and stop
    ``isthmus emulate --gpu H100 --model Llama-3.1-8B --port 8000`` listens on 127.0.0.1 (``--host``
    to change); ``--port 0`` takes any free port. Once it accepts requests it logs (stderr)
    ``isthmus emulate: serving NAME on http://HOST:PORT``. SIGTERM or SIGINT stops it gracefully:
    it stops accepting, lets in-flight requests finish (at most ``--shutdown-timeout`` seconds,
    default 30), and exits with status 0.

Engine flags (vLLM's names and defaults)
    ``--model`` and ``--gpu`` pick the built-in profiles the step times and the KV block count come
    from; ``--served-model-name`` (default: ``--model``); ``--max-model-len`` (default: the model's
    context, capped to the KV cache); ``--max-num-seqs``, ``--max-num-batched-tokens``,
    ``--num-gpu-blocks`` (alias ``--num-gpu-blocks-override``), ``--block-size``,
    ``--gpu-memory-utilization``, ``--[no-]enable-prefix-caching``, ``--[no-]enable-chunked-prefill``;
    ``--tokenizer PATH`` (a ``tokenizer.json``; default the built-in byte-chunk tokenizer of
    :mod:`isthmus.core.tokenizer`); ``--time-scale`` (0.01 runs every step 100x faster);
    ``--seed`` (generated text, injected errors); ``--max-body-bytes`` (default 8 MiB).

Endpoints
    ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed or not; see
    :mod:`isthmus.emulator.openai_api` for what is accepted: one prompt, ``n`` = 1, exactly
    ``max_tokens`` tokens generated, ``finish_reason`` ``"length"``), ``GET /v1/models``,
    ``GET /health`` (200, empty body), ``GET /metrics`` (vLLM's names and labels; see
    :mod:`isthmus.emulator.metrics`). Loopback clients only, unless ``--no-admin``:
    ``GET|POST /admin/fault`` and ``POST /reset_prefix_cache``. Errors have OpenAI's body
    ``{"error": {"message", "type", "param", "code"}}``: malformed JSON or an invalid request 400,
    another model 404, a body over ``--max-body-bytes`` 413 (decided from ``Content-Length`` or
    while reading, so such a body is never read in full, and the connection is closed). A client
    that disconnects has its request dropped from the engine at once.

Fault injection
    Each fault is a flag at start-up and a field of the JSON object ``POST /admin/fault`` takes
    (the object *replaces* the current faults: fields left out are off, ``{}`` clears all;
    ``GET /admin/fault`` shows them). Faults touch generation requests only, except
    ``unhealthy``. A request keeps the faults that were set when it arrived.

    ================================  ====================  ===================================================
    flag                              admin field           behaviour
    ================================  ====================  ===================================================
    ``--fault-refuse``                (start-up only)       every TCP connection is accepted and reset at once
                                                            (RST): clients see "connection reset"; no HTTP.
                                                            For "nothing listens", use a port with no server.
    ``--fault-error-rate R``          ``error_rate``        that share of requests (seeded draw) gets
    ``--fault-error-status S``        ``error_status``      status S (default 500) and an OpenAI error body
                                                            before any generation
    ``--fault-stall-after K``         ``stall_after``       a stream sends its headers and K ``data:`` events,
    ``--fault-stall-seconds T``       ``stall_s``           then nothing for T seconds (no T: until the client
                                                            goes away), then the rest; a non-streamed reply
                                                            (any K) is held back T seconds (or until the client
                                                            goes away) before its headers
    ``--fault-die-after K``           ``die_after``         a stream sends K ``data:`` events and its
                                                            connection is then closed mid-response (no
                                                            ``[DONE]``, an incomplete chunked body); a
                                                            non-streamed reply (any K) sends its headers and
                                                            closes without a body
    ``--fault-die-exit``              ``die_exit``          with ``die_after``: the whole process exits
                                                            (``os._exit(1)``) at that point instead
    ``--fault-unhealthy``             ``unhealthy``         ``GET /health`` answers 503
    ================================  ====================  ===================================================

    The engine keeps generating a stalled request's tokens (they arrive together when the stall
    ends); a request whose client goes away, or whose connection dies, is dropped from the engine.
    SIGTERM ends every stall, so that stalled streams finish within the shutdown drain. The server
    logs one error line per connection it cuts (``ASGI callable returned without completing
    response``).

KV events
    ``--kv-events-endpoint tcp://127.0.0.1:PORT`` publishes vLLM's KV-cache events on a ZMQ PUB
    socket bound there (``tcp://127.0.0.1:*``: any port, logged as ``ZMQ PUB bound at ENDPOINT``;
    ``--kv-events-connect`` connects instead of binding); ``--kv-events-encoding array|map`` picks
    older or newer vLLM's encoding, ``--kv-events-topic`` the topic frame. Format and semantics:
    :mod:`isthmus.emulator.kv_events`.

Tokens and hashes
    The router must tokenize the way the engine double does for block hashes to agree: the same
    ``tokenizer.json`` (via :func:`isthmus.emulator.hf_tokenizer.load_tokenizer`) or the built-in
    :class:`isthmus.core.tokenizer.ByteChunkTokenizer`; completions encode ``prompt`` as given (a
    token-id prompt is used as is), chat renders ``messages`` with
    :func:`isthmus.core.tokenizer.render_chat` first; block hashes are
    :func:`isthmus.core.hashing.hash_token_blocks` of the ids with ``--block-size``.
"""
