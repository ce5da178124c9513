"""The shipped Serve configs validate, and their `deployments:` overrides name real
deployments (a typo would silently not apply)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]


def deployment_names(config: AppConfig) -> set[str]:
    names = {"Ingress", "Scheduler"}
    for node in config.nodes:
        names.add(f"TrafficManager-{node.name}")
        if node.prefill:
            names.add(f"PrefillEngine-{node.name}")
        if node.decode:
            names.add(f"DecodeEngine-{node.name}")
    return names


SHIPPED = ["serve_config.yaml", "serve_config.gpu.yaml", "serve_config.cluster.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate_and_override_real_deployments(name):
    (app,) = yaml.safe_load((ROOT / name).read_text())["applications"]
    config = AppConfig.model_validate(app["args"])
    overrides = {d["name"] for d in app.get("deployments", [])}
    assert overrides <= deployment_names(config)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_bind_loopback_or_require_keys(name):
    """reliability-tests G11: the default binds 127.0.0.1; a config that listens beyond this
    machine must not run the API open (it names tenants or a keys file)."""
    data = yaml.safe_load((ROOT / name).read_text())
    host = data["http_options"]["host"]
    (app,) = data["applications"]
    auth = AppConfig.model_validate(app["args"]).auth
    if name == "serve_config.yaml":
        assert host == "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        assert auth.tenants or auth.keys_file is not None, f"{name} exposes an open API"


def test_the_cluster_config_pins_every_logical_node_and_the_control_plane():
    """Each logical node on its own Ray node (custom resource = node name), the Ingress and
    the Scheduler on the head: a lost worker host takes no control-plane replica along."""
    (app,) = yaml.safe_load((ROOT / "serve_config.cluster.yaml").read_text())["applications"]
    config = AppConfig.model_validate(app["args"])
    assert all(set(n.ray_resources) == {n.name} for n in config.nodes)
    assert set(config.control_ray_resources) == {"head"}


def test_nodes_need_a_prefill_and_a_decode_engine_and_unique_names():
    with pytest.raises(ValidationError, match="at least one prefill"):
        AppConfig.model_validate({"nodes": [{"name": "a", "decode": 1}]})
    with pytest.raises(ValidationError, match="unique"):
        AppConfig.model_validate(
            {"nodes": [{"name": "a", "prefill": 1}, {"name": "a", "decode": 1}]}
        )
    config = AppConfig.model_validate(
        {
            "nodes": [
                {"name": "p", "prefill": 1, "snic_bandwidth": "100MB"},
                {"name": "d", "decode": 2},
            ]
        }
    )
    assert config.nodes[0].snic_bandwidth == 100_000_000


def test_sparse_attention_reaches_decode_engines_only():
    """`engine.attention: sparse` (with its knobs) configures the decode engines; prefill
    engines stay dense (they never decode), and a bad knob is refused at validation."""
    config = AppConfig.model_validate(
        {"engine": {"attention": "sparse", "sparse": {"summary": "minmax", "deep_fraction": 0.1}}}
    )
    decode = config.engine.engine_config(config.model, num_threads=1, prefill=False)
    prefill = config.engine.engine_config(config.model, num_threads=1, prefill=True)
    assert decode.attention == "sparse" and prefill.attention == "dense"
    assert decode.sparse.summary == "minmax" and decode.sparse.deep_fraction == 0.1
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"engine": {"sparse": {"sumary": "mean"}}})


def test_speculation_is_for_decode_engines_and_needs_dense_attention():
    (app,) = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    engine = AppConfig.model_validate(app["args"]).engine
    assert engine.speculative.method == "ngram"  # the shipped default
    assert engine.engine_config(engine_model(), 1).speculative.method == "ngram"
    assert engine.engine_config(engine_model(), 1, prefill=True).speculative.method == "off"
    with pytest.raises(ValidationError, match="dense attention"):
        AppConfig.model_validate(
            {"engine": {"attention": "sparse", "speculative": {"method": "suffix"}}}
        )


def engine_model():
    return AppConfig.model_validate({}).model
