"""The router's config file: defaults, cross-checks, and errors that name the file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from isthmus.core.errors import ConfigError
from isthmus.router.config import RouterConfig, load_config

GOOD = """\
region: us-west
replicas:
  - {url: "http://127.0.0.1:9001/", region: us-west, gpu: a100, model: mistral-7b}
  - {url: "http://127.0.0.1:9002", region: germany, gpu: H100, model: Mistral-7B, id: de-big, num_kv_blocks: 100}
  - {url: "http://127.0.0.1:9003", region: germany, gpu: H100, model: Mistral-7B, engine: sglang}
regions:
  rtt_ms: {us-west: {germany: 281}}
policy: gorgo_proxy
models: [mistral]
api_keys: [sekrit]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "router.yaml"
    p.write_text(text)
    return p


def test_a_good_file_loads_with_every_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.listen.host == "127.0.0.1" and cfg.mode == "proxy"
    assert cfg.replica_ids == ("us-west-0", "de-big", "germany-1")
    assert cfg.replicas[0].url == "http://127.0.0.1:9001" and cfg.replicas[0].gpu == "A100-80GB"
    assert cfg.timeouts.connect_s == 5.0 and cfg.timeouts.idle_s == 60.0
    assert cfg.limits.max_body_bytes == 4 * 1024 * 1024
    assert cfg.retries.budget == 0.2
    h = cfg.health
    assert (h.unhealthy_after, h.healthy_after, h.eject_after) == (3, 2, 5)
    assert cfg.scrape_period_s == 0.1 and cfg.regions.ewma_alpha == 0.3
    assert cfg.regions.rtt_s()[("germany", "us-west")] == pytest.approx(0.281)
    assert cfg.accepted_api_keys() == ("sekrit",)
    assert "sekrit" not in repr(cfg)  # keys are secrets: never in a repr, hence never in a log line


def test_policy_timings_come_from_the_policy_unless_the_file_sets_them(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD.replace("policy: gorgo_proxy", "policy: {name: gorgo, params: "
                                                   "{recheck_s: 0.05, sync_period_s: 2.0}}")))
    policy = cfg.make_policy()
    assert cfg.resolved_recheck_s(policy) == 0.05 and cfg.resolved_sync_period_s(policy) == 2.0
    cfg2 = cfg.model_copy(update={"recheck_s": 0.5})
    assert cfg2.resolved_recheck_s(policy) == 0.5
    assert load_config(write(tmp_path, GOOD)).resolved_recheck_s(object()) == 0.02


def test_api_keys_from_the_environment(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD.replace("api_keys: [sekrit]", "api_keys_env: KEYS")))
    assert cfg.accepted_api_keys({"KEYS": "a, b,,"}) == ("a", "b")
    assert cfg.accepted_api_keys({}) == ()


@pytest.mark.parametrize(("edit", "where", "what"), [
    (("gpu: a100", "gpu: B200"), ":3: replicas.0.gpu", "unknown GPU 'B200'"),
    (("models: [mistral]", "models: [mistral]\nmodles: [x]"), ":10: modles", "unknown field"),
    (("policy: gorgo_proxy", "policy: {name: nope}"), ":8: policy", "unknown policy 'nope'"),
    (("policy: gorgo_proxy", "policy: {name: gorgo_proxy, params: {q_hat: -1}}"), ":8: policy", "q_hat"),
    (('"http://127.0.0.1:9001/"', '"ftp://x"'), ":3: replicas.0.url", "http(s) URL"),
    (("id: de-big", "id: us-west-0"), ":4: replicas.1.id", "duplicate replica id"),
    (("rtt_ms: {us-west: {germany: 281}}", "rtt_ms: {us-west: {germany: 281}, germany: {us-west: 5}}"),
     ":7: regions.rtt_ms.us-west.germany", "symmetric"),
    (("api_keys: [sekrit]", "peers: [{region: x, url: 'http://h:1'}]"), ":10: peers", "regional only"),
    (("region: us-west\n", "region: us-west\nregion: x\n"), ":2:", "duplicate key 'region'"),
    (("rtt_ms: {us-west: {germany: 281}}", "rtt_ms: {}\n  measure: false"), ":7: regions.rtt_ms",
     "no RTT between 'us-west' and 'germany'"),
])
def test_errors_name_the_file_line_and_field(tmp_path: Path, edit: tuple[str, str], where: str, what: str) -> None:
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and where in msg and what in msg, msg


def test_regional_mode_lists_only_its_own_replicas_and_distinct_peers() -> None:
    base = {"region": "a", "mode": "regional", "models": ["m"],
            "replicas": [{"url": "http://h:1", "region": "a", "gpu": "A100", "model": "Mistral-7B"}],
            "peers": [{"region": "b", "url": "http://h:2"}]}
    RouterConfig.model_validate(base)
    with pytest.raises(ValueError, match="not this router's region"):
        RouterConfig.model_validate({**base, "replicas": [{**base["replicas"][0], "region": "b"}]})
    with pytest.raises(ValueError, match="own region"):
        RouterConfig.model_validate({**base, "peers": [{"region": "a", "url": "http://h:2"}]})


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"router.yaml:2:1: YAML syntax error"):
        load_config(write(tmp_path, "region: [unclosed\n"))


def test_the_annotated_example_in_the_module_docstring_loads(tmp_path: Path) -> None:
    import isthmus.router.config as mod

    doc = mod.__doc__ or ""
    block = doc.split("Annotated example (every default shown)::\n\n", 1)[1].split("\n\n", 1)[0]
    text = "\n".join(line[4:] for line in block.splitlines())
    cfg = load_config(write(tmp_path, text))
    assert cfg == cfg.model_copy()  # frozen and complete
    defaults = RouterConfig(region="x", models=("m",), replicas=cfg.replicas)
    for name in ("listen", "timeouts", "limits", "retries", "health", "scrape_period_s", "drain_s", "block_size"):
        assert getattr(cfg, name) == getattr(defaults, name), name
