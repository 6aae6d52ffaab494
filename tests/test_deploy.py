"""The deployment files agree with the Kubernetes schemas and with the service."""

from __future__ import annotations

import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from app.config import Settings
from tests.conftest import ROOT

K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_manifests_validate_strictly(path):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_validator_rejects_a_broken_manifest():
    doc = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"not": "a port"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_cli_validation_as_the_readme_shows():
    cli = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.30.0", *map(str, K8S)]
    assert subprocess.run(cli, capture_output=True).returncode == 0


def test_probes_ports_and_body_limit_match_the_service():
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == Settings().port
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert grace > int(env["GRACEFUL_TIMEOUT_S"])  # Kubernetes waits longer than the drain
    nginx = (ROOT / "deploy" / "nginx" / "voice-embed.conf").read_text()
    size_mb = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1))
    assert size_mb * 1024 * 1024 == Settings().max_body_bytes
    # nginx waits for /diarize's answer as long as a recording of the longest length takes at the
    # slowest real-time factor the service aims for (0.1, on AVX2), with room for work queued before it
    diarize = re.search(r"location = /diarize \{([^}]*)\}", nginx)
    assert diarize, "deploy/nginx/voice-embed.conf: no 'location = /diarize' block"
    read_s = int(re.search(r"proxy_read_timeout (\d+)s;", diarize.group(1)).group(1))
    assert read_s >= 2 * 0.1 * Settings().diarize_max_duration_s
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    assert {"app1", "app2", "app3", "nginx", "postgres"} <= set(compose["services"])
    assert all("DATABASE_URL" in compose["services"][f"app{i}"]["environment"] for i in (1, 2, 3))
    assert "speakers-db" in compose["volumes"]
    env_from = next(e for e in container["env"] if e["name"] == "DATABASE_URL")["valueFrom"]
    secret = yaml.safe_load((ROOT / "deploy" / "k8s" / "secret.yaml").read_text())
    assert secret["metadata"]["name"] == env_from["secretKeyRef"]["name"]
    assert env_from["secretKeyRef"]["key"] in secret["stringData"]
    upstreams = re.findall(r"server (app\d):8000", nginx)
    assert set(upstreams) == {"app1", "app2", "app3"}
