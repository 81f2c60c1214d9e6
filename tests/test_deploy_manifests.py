"""deploy/*.yaml as far as it can be checked without a cluster: each document valid against
the Kubernetes schema (kubernetes-validate, strict: an unknown or misspelt field fails), and
consistent with the server: its arguments are `polyprompt serve` flags, its variables are
settings, its probes are routes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from registry.settings import ENV_PREFIX, add_flags
from server.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30.0"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))


def test_schema_valid(docs):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    assert {d["kind"] for d in docs} == {"Secret", "Deployment", "Service"}
    for d in docs:
        kv.validate(d, K8S_VERSION, strict=True)
    bad = {**docs[1], "spec": {**docs[1]["spec"], "replicsa": 2}}
    with pytest.raises(kv.ValidationError):  # the check can fail
        kv.validate(bad, K8S_VERSION, strict=True)


def test_consistent_with_the_server(docs):
    import argparse

    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "serve"
    parser = argparse.ArgumentParser()
    add_flags(parser, Settings)
    parser.parse_args(args[1:])  # every flag exists (SystemExit otherwise)
    fields = {f.upper() for f in Settings.model_fields}
    for env in container["env"]:
        assert env["name"].startswith(ENV_PREFIX) and env["name"][len(ENV_PREFIX):] in fields, env["name"]
    secret = next(d for d in docs if d["kind"] == "Secret")
    for env in container["env"]:
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings.model_fields["drain_timeout"].default  # running requests can finish
