"""The router's ``tokenizer`` file: with the same ``tokenizer.json`` as the engine doubles it hashes
prompts as they do, so a repeated prompt goes to the replica that caches its prefix and hits there."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from router_harness import RouterThread, config, emulators, replica, running_router, wait_until

from isthmus.core.hashing import hash_token_blocks
from isthmus.core.tokenizer import ByteChunkTokenizer
from isthmus.emulator.filler import FILLER_WORDS
from isthmus.router.config import RouterConfig
from isthmus.tokenizer_file import HFTokenizer, load_tokenizer

SENTENCES = [
    "Routing requests across regions by latency, queues and caches.",
    "A shared system prompt keeps the prefix cache warm on one replica.",
    "The router sends each prompt where its first blocks are already cached.",
]


def make_tokenizer(path: Path) -> Path:
    """A small byte-level BPE vocabulary trained on a few sentences, saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*SENTENCES, " ".join(FILLER_WORDS)] * 10, trainer)
    tok.save(str(path))
    return path


def stream(rt: RouterThread, prompt: str) -> dict[str, str]:
    """One streamed completion through the router; returns the response headers."""
    c = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=20)
    try:
        c.request("POST", "/v1/completions",
                  json.dumps({"model": "m", "prompt": prompt, "max_tokens": 4, "stream": True}),
                  {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        assert r.status == 200
        return {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


def test_a_missing_tokenizer_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tokenizer"):
        RouterConfig.model_validate(config([replica("http://127.0.0.1:1")], tokenizer=str(tmp_path / "nope.json")))


def test_router_and_engines_hash_prompts_with_the_same_tokenizer_file(tmp_path: Path) -> None:
    tok_path = make_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tok_path)
    assert isinstance(tok, HFTokenizer)
    prompt = " ".join(SENTENCES) * 40
    ids = tok.encode(prompt)
    hashes = hash_token_blocks(ids, 16)
    assert hashes != hash_token_blocks(ByteChunkTokenizer().encode(prompt), 16)
    with emulators(tmp_path, 2, "--model", "Mistral-7B", "--gpu", "A100", "--served-model-name", "m",
                   "--time-scale", "0.01", "--num-gpu-blocks", "4000", "--tokenizer", str(tok_path)) as engines, \
            running_router(config([replica(e.url) for e in engines], policy="gorgo_proxy",
                                  regions={"measure": False}, tokenizer=str(tok_path))) as rt:
        assert isinstance(rt.router.tokenizer, HFTokenizer)
        state = rt.router.state
        # the mirror is rebuilt (empty) when the router learns the engines' KV size: let that happen first
        assert wait_until(lambda: all(state.replicas[r].capacity_blocks == 4000 for r in ("east-0", "east-1")))
        # both idle: a tie would go to east-0; queue work for east-0 in the router's books
        busy = state.replicas["east-0"].dispatch(50_000)
        first = stream(rt, prompt)
        assert first["x-isthmus-target"] == "east-1"
        busy.finish()
        # the router recorded the prompt's blocks under the file tokenizer's hashes
        assert state.matched_blocks(hashes, "east-1") == len(hashes)
        assert state.matched_blocks(hashes, "east-0") == 0
        holder = engines[1]
        hits_before = holder.metric("vllm:prefix_cache_hits_total")
        second = stream(rt, prompt + " And one more question?")
        assert second["x-isthmus-target"] == "east-1"
        hits = holder.metric("vllm:prefix_cache_hits_total") - hits_before
        assert hits >= (len(ids) // 16 - 1) * 16  # the engine found the blocks the router expected


def test_a_relative_tokenizer_path_is_read_beside_the_config(tmp_path, monkeypatch) -> None:
    from isthmus.router.config import load_config

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "tok.json").write_text("{}")
    cfg = tmp_path / "conf" / "router.yaml"
    cfg.write_text(
        "region: a\nmodels: [m]\ntokenizer: tok.json\n"
        "replicas: [{url: 'http://127.0.0.1:9', region: a, gpu: A100, model: Mistral-7B}]\n"
        "policy: least_load\n"
    )
    monkeypatch.chdir(tmp_path)  # the working directory does not hold tok.json
    assert load_config(cfg).tokenizer == tmp_path / "conf" / "tok.json"
