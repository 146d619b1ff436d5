"""Deployment files: Kubernetes manifests against the real API schemas (kubernetes-validate,
offline), compose and Dockerfiles checked for what matters. No Docker engine or cluster
exists here, so images are not built and manifests are not applied."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = sorted((ROOT / "docker" / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("path", K8S, ids=[p.name for p in K8S])
def test_kubernetes_manifests_validate(path: Path) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_manifests_route_by_readiness_and_scale_on_sessions() -> None:
    deploy = yaml.safe_load((ROOT / "docker/k8s/deployment.yaml").read_text())
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    hpa = yaml.safe_load((ROOT / "docker/k8s/hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "omnivox_active_sessions"
    ingress = yaml.safe_load((ROOT / "docker/k8s/ingress.yaml").read_text())
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/affinity"] == "cookie"


def test_the_served_metric_exists() -> None:
    from server.metrics import Metrics

    assert b"omnivox_active_sessions" in Metrics().render()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(name: str) -> None:
    text = (ROOT / "docker" / name).read_text()
    stages = re.findall(r"^FROM .* AS (\w+)$", text, re.MULTILINE)
    assert stages == ["build", "runtime"]  # multi-stage
    assert re.search(r"^USER omnivox$", text, re.MULTILINE)  # non-root
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert "pip install torch==2.13.0" in text and "--no-deps openai-whisper" in text
    copies = re.findall(r"^COPY (.*)$", text, re.MULTILINE)
    assert not any(w in c for c in copies for w in (".pth", ".pt ", "models", "checkpoint"))  # no baked weights
    for rel in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
        assert (ROOT / rel).exists(), rel


def test_compose_and_dockerignore() -> None:
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    svc = compose["services"]["omnivox"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert any(v.startswith("hf-cache:") for v in svc["volumes"]) and "hf-cache" in compose["volumes"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "*.pth"} <= set(ignored)
