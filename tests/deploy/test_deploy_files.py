"""The deployment files (compose, Kubernetes, Dockerfiles) are valid, pinned and consistent.

No container engine or network is needed: deploy/check.sh validates against schemas that pinned
Python packages ship, and the rest reads the files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHECK_SH = DEPLOY / "check.sh"
# An exact version (1.2 or 1.2.3 or a Go pseudo-version) or a digest; anything else floats.
PINNED_TAG = re.compile(r"\d+\.\d+|v0\.0\.0-\d{14}-[0-9a-f]{12}")


def _run_check(deploy_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMAGEMESH_PYTHON": os.environ.get("IMAGEMESH_PYTHON", sys.executable)}
    if deploy_dir is not None:
        env["DEPLOY_DIR"] = str(deploy_dir)
    return subprocess.run(
        ["bash", str(CHECK_SH)], env=env, capture_output=True, text=True, check=False
    )


def _versions_env() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / "local" / "versions.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    return loaded


def _k8s_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path.name, document


def _workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, document in _k8s_documents():
        if document["kind"] in {"Deployment", "StatefulSet"}:
            yield document["metadata"]["name"], document


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = pod["containers"] + pod.get("initContainers", [])
    return containers


def _dockerfile_images() -> Iterator[tuple[str, str]]:
    for path in sorted(DEPLOY.rglob("Dockerfile")):
        stages: set[str] = set()
        for line in path.read_text().splitlines():
            match = re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
            if match:
                image, stage = match.groups()
                if image not in stages:  # FROM <earlier stage> is not an image
                    yield str(path.relative_to(REPO)), image
                if stage:
                    stages.add(stage)


def _all_images() -> list[tuple[str, str]]:
    images = [(f"compose:{name}", s["image"]) for name, s in _compose()["services"].items()]
    for name, workload in _workloads():
        images += [(f"k8s:{name}", c["image"]) for c in _containers(workload)]
    images += list(_dockerfile_images())
    return images


def test_check_script_passes_offline_schema_validation() -> None:
    result = _run_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deploy checks passed" in result.stdout


@pytest.mark.parametrize(
    ("relative", "old", "new"),
    [
        # A misspelt field in a manifest: strict validation must refuse it.
        ("k8s/storage.yaml", "  replicas: 2\n", "  replicaz: 2\n"),
        # A wrong type in compose: the Compose schema must refuse it.
        ("compose/compose.yaml", "    hostname: minio1\n", "    hostname: [minio1]\n"),
    ],
)
def test_check_script_rejects_a_broken_file(
    tmp_path: Path, relative: str, old: str, new: str
) -> None:
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / relative
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    result = _run_check(copy)
    assert result.returncode != 0, result.stdout


def test_every_image_is_pinned_to_an_exact_version() -> None:
    images = _all_images()
    assert len(images) >= 10
    floating = [
        (where, image)
        for where, image in images
        if "@sha256:" not in image
        and (":" not in image or image.endswith(":latest") or not PINNED_TAG.search(image))
    ]
    assert not floating, f"images without an exact version: {floating}"


def test_image_versions_match_the_local_engines() -> None:
    versions = _versions_env()
    images = {image for _, image in _all_images()}
    assert f"docker.elastic.co/elasticsearch/elasticsearch:{versions['ES_VERSION']}" in images
    assert f"imagemesh/minio:{versions['MINIO_VERSION']}" in images
    minio_dockerfile = (DEPLOY / "minio" / "Dockerfile").read_text()
    assert f"ARG MINIO_VERSION={versions['MINIO_VERSION']}\n" in minio_dockerfile
    service_dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG HEALTH_PROBE_VERSION={versions['HEALTH_PROBE_VERSION']}\n" in service_dockerfile


def test_compose_services_are_health_checked_and_bound_to_loopback() -> None:
    services = _compose()["services"]
    assert {"minio1", "minio2", "minio3", "minio4", "es1", "es2", "es3"} <= services.keys()
    assert {"spark-master", "spark-worker-1", "spark-worker-2"} <= services.keys()
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    for name, port in {"storage": 50051, "search": 50052, "inference": 50053}.items():
        service = services[name]
        assert service["command"] == ["serve", name]
        assert service["healthcheck"]["test"][1] == "grpc-health-probe"
        assert f"-addr=localhost:{port}" in service["healthcheck"]["test"]


def test_k8s_workloads_have_probes_requests_and_disruption_budgets() -> None:
    documents = [document for _, document in _k8s_documents()]
    budgets = {
        tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
        for d in documents
        if d["kind"] == "PodDisruptionBudget"
    }
    for name, workload in _workloads():
        for container in _containers(workload):
            assert "readinessProbe" in container, f"{name} lacks a readiness probe"
            assert "livenessProbe" in container, f"{name} lacks a liveness probe"
            assert container["resources"]["requests"], f"{name} lacks resource requests"
        if name in {"storage", "search", "inference"}:
            (container,) = _containers(workload)
            assert "grpc" in container["readinessProbe"]
            assert "grpc" in container["livenessProbe"]
        if workload["spec"]["replicas"] > 1:
            labels = tuple(sorted(workload["spec"]["selector"]["matchLabels"].items()))
            assert labels in budgets, f"{name} has no PodDisruptionBudget"


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from imagemesh.config import Settings

    for key in [k for k in os.environ if k.startswith("IMAGEMESH_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_compose_service_environment_is_valid_imagemesh_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = _compose()["services"]
    for name in ("storage", "search", "inference"):
        with monkeypatch.context() as patch:
            env = {
                key: "secret" if str(value).startswith("${") else str(value)
                for key, value in services[name]["environment"].items()
            }
            settings = _settings_from(env, patch)
            assert settings.storage.backend == "s3"
            assert settings.search.backend == "elasticsearch"
            assert settings.spark.master.startswith("spark://")


def test_k8s_config_and_secret_are_valid_imagemesh_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    documents = {d["metadata"]["name"]: d for _, d in _k8s_documents()}
    env = {**documents["imagemesh-config"]["data"], **documents["imagemesh-secrets"]["stringData"]}
    imagemesh_env = {k: str(v) for k, v in env.items() if k.startswith("IMAGEMESH_")}
    settings = _settings_from(imagemesh_env, monkeypatch)
    assert settings.storage.backend == "s3"
    assert settings.search.backend == "elasticsearch"
    assert settings.storage_address.endswith(":50051")
