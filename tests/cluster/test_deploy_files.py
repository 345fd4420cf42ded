"""The deploy files validate offline against their schemas (kubernetes-validate's bundled Kubernetes schemas,
check-jsonschema's vendored compose schema), and the pods are production-shaped: `restricted` security, a grace period
above the drain timeout, GPUs requested, pinned images."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31.0"
CRD_KINDS = {"RayService", "ServiceMonitor", "PodMonitor"}  # custom resources: no schema ships offline
DRAIN_TIMEOUT_S = 30


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(KUBERNETES_DIR.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize(("name", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_against_the_kubernetes_schema(name, doc):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if doc["kind"] in CRD_KINDS:
        pytest.skip(f"{doc['kind']} is a custom resource: kubernetes-validate ships no schema for it offline")
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def pod_specs() -> list[dict]:
    specs = []
    for _, doc in documents():
        if doc["kind"] == "Deployment":
            specs.append(doc["spec"]["template"]["spec"])
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            specs += [group["template"]["spec"] for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]
    return specs


def test_pods_are_restricted_pinned_and_outlast_the_drain():
    specs = pod_specs()
    assert len(specs) == 3
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert "@sha256:" in container["image"]
    serving = [spec for spec in specs if any("nvidia.com/gpu" in c["resources"]["limits"] for c in spec["containers"])]
    assert len(serving) == 2
    for spec in serving:
        assert spec["terminationGracePeriodSeconds"] > DRAIN_TIMEOUT_S
        assert all("preStop" in container["lifecycle"] for container in spec["containers"])


def test_compose_file_validates_against_the_compose_schema():
    pytest.importorskip("check_jsonschema")
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(ROOT / "deploy" / "docker-compose.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
