"""A small, pure-Python kustomize renderer for facegate's deploy/ tree.

It implements exactly the kustomize features that deploy/ uses, so that the
deployment tests run on a machine without ``kubectl``/``kustomize``; where a binary
exists, tests/unit/test_deploy.py renders with both and asserts they agree.
Anything outside this subset raises :class:`Unsupported` instead of being rendered
wrongly — add the feature here (and a test) before using it in deploy/.

Supported kustomization fields:

- ``resources``: YAML files (multi-document) and directories holding a kustomization
- ``namespace``: set on every (namespaced) resource
- ``labels``: ``pairs`` with ``includeSelectors: false`` and no ``includeTemplates``
  (metadata.labels only)
- ``configMapGenerator`` / ``secretGenerator``: ``literals`` and ``files``
  (``path`` or ``key=path``), ``behavior`` create | merge | replace, ``type`` for
  secrets; names get kustomize's content-hash suffix and references in pod specs
  (volumes, envFrom, env valueFrom, imagePullSecrets) are renamed to match
- ``images``: ``name`` with ``newName`` / ``newTag`` / ``digest``
- ``replicas``: ``name`` + ``count``
- ``patches``: inline (``patch:``) or file (``path:``) JSON6902 operation lists
  (add, remove, replace, test) with a ``target`` of ``kind`` and/or ``name``

Usage: ``python -m tests.deploy_render deploy/overlays/dev`` prints the manifests.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

_SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "configMapGenerator",
    "secretGenerator",
    "images",
    "replicas",
    "patches",
}
_GENERATOR_FIELDS = {"name", "behavior", "literals", "files", "type"}
_GENERATED = "__deploy_render_generated__"  # marker key, removed before output

# kustomize's "legacy" output order (api/resid/gvk.go: orderFirst / orderLast).
_ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
_ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]

_CLUSTER_SCOPED = {
    "Namespace",
    "StorageClass",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "PersistentVolume",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
}


class Unsupported(Exception):
    """deploy/ uses a kustomize feature this renderer does not implement."""


class RenderError(Exception):
    """The kustomization is invalid (kustomize itself would refuse it too)."""


# --------------------------------------------------------------------------- loading


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise RenderError(f"{directory}: no kustomization file")


def _load_yaml_documents(path: Path) -> list[Resource]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
    return docs


def _inside(root: Path, path: Path) -> Path:
    """kustomize's default load restrictor: files must lie in or below the kustomization root."""
    resolved = path.resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise RenderError(f"{path}: outside the kustomization root {root} (kustomize refuses this)")
    return resolved


# ------------------------------------------------------------------------ generators


def _split_kv(item: str, where: str) -> tuple[str, str]:
    if "=" not in item:
        raise RenderError(f"{where}: {item!r} is not KEY=VALUE")
    key, value = item.split("=", 1)
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key, value


def _generator_data(root: Path, spec: dict[str, Any], where: str) -> dict[str, str]:
    unknown = set(spec) - _GENERATOR_FIELDS
    if unknown:
        raise Unsupported(f"{where}: generator field(s) {sorted(unknown)}")
    data: dict[str, str] = {}
    for literal in spec.get("literals", []) or []:
        key, value = _split_kv(str(literal), where)
        data[key] = value
    for raw in spec.get("files", []) or []:
        entry = str(raw)
        key, rel = entry.split("=", 1) if "=" in entry else (Path(entry).name, entry)
        path = _inside(root, root / rel)
        data[key] = path.read_text(encoding="utf-8")
    return data


def _generate(root: Path, spec: dict[str, Any], kind: str, where: str) -> Resource:
    data = _generator_data(root, spec, where)
    obj: Resource = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["type"] = spec.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v.encode("utf-8")).decode("ascii") for k, v in data.items()}
    else:
        if "type" in spec:
            raise Unsupported(f"{where}: 'type' on a configMapGenerator")
        obj["data"] = data
    obj[_GENERATED] = True
    return obj


def _apply_generators(root: Path, kustomization: dict[str, Any], resources: list[Resource]) -> None:
    for field, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for spec in kustomization.get(field, []) or []:
            where = f"{root}: {field} {spec.get('name')!r}"
            behavior = spec.get("behavior", "create")
            generated = _generate(root, spec, kind, where)
            existing = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == spec["name"]]
            if behavior == "create":
                if existing:
                    raise RenderError(f"{where}: already exists (use behavior: merge or replace)")
                resources.append(generated)
            elif behavior in ("merge", "replace"):
                if len(existing) != 1:
                    raise RenderError(f"{where}: behavior {behavior} needs exactly one existing {kind}")
                target = existing[0]
                if not target.get(_GENERATED):
                    raise Unsupported(f"{where}: merging into a non-generated {kind}")
                if behavior == "merge":
                    target["data"] = {**target.get("data", {}), **generated["data"]}
                else:
                    target["data"] = generated["data"]
                if kind == "Secret" and "type" in spec:
                    target["type"] = generated["type"]
            else:
                raise RenderError(f"{where}: unknown behavior {behavior!r}")


def _go_json(value: Any) -> str:
    """json.Marshal as Go does it for map[string]any: sorted keys, HTML-safe escapes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text


def content_hash(obj: Resource) -> str:
    """kustomize's name-suffix hash of a ConfigMap or Secret (api/hasher).

    sha256 of a Go-JSON object {kind, name, data[, type]}, first 10 hex digits with
    0,1,3,a,e mapped to g,h,k,m,t. kustomize looks the name up with the single path
    element "metadata/name", which never matches, so "name" is always "" — the hash
    depends on the content only (checked against kubectl kustomize in the tests).
    """
    encoded: dict[str, Any] = {"kind": obj["kind"], "name": "", "data": obj.get("data", {})}
    if obj["kind"] == "Secret":
        encoded["type"] = obj.get("type", "Opaque")
    digest = hashlib.sha256(_go_json(encoded).encode("utf-8")).hexdigest()
    table = str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"})
    return digest[:10].translate(table)


# ---------------------------------------------------------------------- transformers


def _json_pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _container(doc: Any, token: str, path: str) -> Any:
    if isinstance(doc, list):
        if not token.isdigit() or int(token) >= len(doc):
            raise RenderError(f"JSON patch path {path!r}: no index {token}")
        return doc[int(token)]
    if isinstance(doc, dict):
        if token not in doc:
            raise RenderError(f"JSON patch path {path!r}: no key {token!r}")
        return doc[token]
    raise RenderError(f"JSON patch path {path!r}: cannot descend into a scalar")


def _json6902(doc: Resource, operations: list[dict[str, Any]], where: str) -> None:
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        tokens = _json_pointer(path)
        if not tokens:
            raise Unsupported(f"{where}: whole-document JSON patch")
        parent: Any = doc
        for token in tokens[:-1]:
            parent = _container(parent, token, path)
        last = tokens[-1]
        if kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                elif last.isdigit() and int(last) <= len(parent):
                    parent.insert(int(last), value)
                else:
                    raise RenderError(f"{where}: bad list index in {path!r}")
            else:
                parent[last] = value
        elif kind == "replace":
            _container(parent, last, path)  # must exist
            parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            _container(parent, last, path)
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind == "test":
            if _container(parent, last, path) != op["value"]:
                raise RenderError(f"{where}: test failed at {path!r}")
        else:
            raise Unsupported(f"{where}: JSON patch op {kind!r}")


def _matches(resource: Resource, target: dict[str, Any], where: str) -> bool:
    unknown = set(target) - {"kind", "name"}
    if unknown:
        raise Unsupported(f"{where}: patch target field(s) {sorted(unknown)}")
    if "kind" in target and not re.fullmatch(str(target["kind"]), resource["kind"]):
        return False
    return not ("name" in target and not re.fullmatch(str(target["name"]), resource["metadata"]["name"]))


def _apply_patches(root: Path, kustomization: dict[str, Any], resources: list[Resource]) -> None:
    for index, patch in enumerate(kustomization.get("patches", []) or []):
        where = f"{root}: patches[{index}]"
        unknown = set(patch) - {"target", "patch", "path"}
        if unknown:
            raise Unsupported(f"{where}: field(s) {sorted(unknown)}")
        text = _inside(root, root / patch["path"]).read_text(encoding="utf-8") if "path" in patch else patch["patch"]
        operations = yaml.safe_load(text)
        if not isinstance(operations, list):
            raise Unsupported(f"{where}: strategic-merge patches (only JSON6902 lists are implemented)")
        if "target" not in patch:
            raise RenderError(f"{where}: a JSON6902 patch needs a target")
        hits = [r for r in resources if _matches(r, patch["target"], where)]
        if not hits:
            raise RenderError(f"{where}: target {patch['target']} matches nothing")
        for resource in hits:
            _json6902(resource, operations, where)


def _set_labels(kustomization: dict[str, Any], resources: list[Resource], root: Path) -> None:
    for entry in kustomization.get("labels", []) or []:
        if entry.get("includeSelectors") or entry.get("includeTemplates") or set(entry) - {"pairs", "includeSelectors"}:
            raise Unsupported(f"{root}: labels other than metadata-only pairs")
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update({k: str(v) for k, v in entry["pairs"].items()})


def _walk_containers(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _walk_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_containers(item)


def _split_image(image: str) -> tuple[str, str, str]:
    """name, tag, digest (tag/digest without their separators)."""
    name, digest = image.split("@", 1) if "@" in image else (image, "")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _set_images(kustomization: dict[str, Any], resources: list[Resource], root: Path) -> None:
    for spec in kustomization.get("images", []) or []:
        unknown = set(spec) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise Unsupported(f"{root}: images field(s) {sorted(unknown)}")
        for resource in resources:
            for container in _walk_containers(resource.get("spec")):
                name, tag, digest = _split_image(str(container.get("image", "")))
                if name != spec["name"]:
                    continue
                name = spec.get("newName", name)
                if "newTag" in spec:
                    tag, digest = str(spec["newTag"]), ""
                if "digest" in spec:
                    tag, digest = "", str(spec["digest"])
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _set_replicas(kustomization: dict[str, Any], resources: list[Resource], root: Path) -> None:
    for spec in kustomization.get("replicas", []) or []:
        hits = [
            r
            for r in resources
            if r["metadata"]["name"] == spec["name"] and r["kind"] in ("Deployment", "StatefulSet", "ReplicaSet")
        ]
        if not hits:
            raise RenderError(f"{root}: replicas: no workload named {spec['name']!r}")
        for resource in hits:
            resource.setdefault("spec", {})["replicas"] = int(spec["count"])


def _set_namespace(kustomization: dict[str, Any], resources: list[Resource]) -> None:
    namespace = kustomization.get("namespace")
    if not namespace:
        return
    for resource in resources:
        if resource["kind"] not in _CLUSTER_SCOPED:
            resource["metadata"]["namespace"] = namespace


# ---------------------------------------------------------------- name references


def _pod_specs(resource: Resource) -> Iterator[dict[str, Any]]:
    spec = resource.get("spec") or {}
    kind = resource["kind"]
    if kind == "Pod":
        yield spec
    elif kind == "CronJob":
        yield spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    elif "template" in spec:
        yield spec["template"].get("spec", {})


def _rename_refs(resource: Resource, renames: dict[tuple[str, str], str]) -> None:
    def new(kind: str, name: str) -> str:
        return renames.get((kind, name), name)

    for pod in _pod_specs(resource):
        for volume in pod.get("volumes", []) or []:
            if "configMap" in volume:
                volume["configMap"]["name"] = new("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                volume["secret"]["secretName"] = new("Secret", volume["secret"]["secretName"])
            for source in (volume.get("projected") or {}).get("sources", []) or []:
                if "configMap" in source:
                    source["configMap"]["name"] = new("ConfigMap", source["configMap"]["name"])
                if "secret" in source:
                    source["secret"]["name"] = new("Secret", source["secret"]["name"])
        for pull in pod.get("imagePullSecrets", []) or []:
            pull["name"] = new("Secret", pull["name"])
        for container in [*(pod.get("containers") or []), *(pod.get("initContainers") or [])]:
            for env_from in container.get("envFrom", []) or []:
                if "configMapRef" in env_from:
                    env_from["configMapRef"]["name"] = new("ConfigMap", env_from["configMapRef"]["name"])
                if "secretRef" in env_from:
                    env_from["secretRef"]["name"] = new("Secret", env_from["secretRef"]["name"])
            for env in container.get("env", []) or []:
                source = env.get("valueFrom") or {}
                if "configMapKeyRef" in source:
                    source["configMapKeyRef"]["name"] = new("ConfigMap", source["configMapKeyRef"]["name"])
                if "secretKeyRef" in source:
                    source["secretKeyRef"]["name"] = new("Secret", source["secretKeyRef"]["name"])


# ------------------------------------------------------------------------- driver


def _build(directory: Path, stack: tuple[Path, ...] = ()) -> list[Resource]:
    directory = directory.resolve()
    if directory in stack:
        raise RenderError(f"{directory}: cycle in resources")
    path = _kustomization_file(directory)
    kustomization = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(kustomization) - _SUPPORTED_FIELDS
    if unknown:
        raise Unsupported(f"{path}: field(s) {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []) or []:
        target = directory / entry
        if target.is_dir():
            resources.extend(_build(target, (*stack, directory)))
        elif target.is_file():
            resources.extend(_load_yaml_documents(_inside(directory, target)))
        else:
            raise RenderError(f"{path}: resource {entry!r} not found (remote bases are not supported)")
    _apply_generators(directory, kustomization, resources)
    # kustomize's built-in transformer order: patches, namespace, labels, replicas, images.
    _apply_patches(directory, kustomization, resources)
    _set_namespace(kustomization, resources)
    _set_labels(kustomization, resources, directory)
    _set_replicas(kustomization, resources, directory)
    _set_images(kustomization, resources, directory)
    seen: set[tuple[str, str, str]] = set()
    for resource in resources:
        ident = (resource["kind"], resource["metadata"].get("namespace", ""), resource["metadata"]["name"])
        if ident in seen:
            raise RenderError(f"{path}: duplicate resource {ident}")
        seen.add(ident)
    return resources


def _gvk(resource: Resource) -> str:
    """kustomize's Gvk.String(): group_version_kind, "~G" for the core group."""
    group, _, version = str(resource["apiVersion"]).rpartition("/")
    return "_".join((group or "~G", version, resource["kind"]))


def _order(resource: Resource) -> tuple[int, str, str, str]:
    """Kinds kustomize ranks come in that order; the others (e.g. custom resources) between
    them, sorted by group_version_kind as kustomize's Gvk.IsLessThan does."""
    kind = resource["kind"]
    if kind in _ORDER_FIRST:
        rank = _ORDER_FIRST.index(kind)
    elif kind in _ORDER_LAST:
        rank = len(_ORDER_FIRST) + 1 + _ORDER_LAST.index(kind)
    else:
        rank = len(_ORDER_FIRST)
    return (rank, _gvk(resource), resource["metadata"].get("namespace", ""), resource["metadata"]["name"])


def render(directory: str | Path) -> list[Resource]:
    """Render a kustomization directory like ``kustomize build`` (the subset above)."""
    resources = copy.deepcopy(_build(Path(directory)))
    renames: dict[tuple[str, str], str] = {}
    for resource in resources:
        if resource.pop(_GENERATED, False):
            old = resource["metadata"]["name"]
            new = f"{old}-{content_hash(resource)}"
            resource["metadata"]["name"] = new
            renames[(resource["kind"], old)] = new
    for resource in resources:
        _rename_refs(resource, renames)
    return sorted(resources, key=_order)


def dump(resources: list[Resource]) -> str:
    return str(yaml.safe_dump_all(resources, sort_keys=True, default_flow_style=False))


if __name__ == "__main__":  # pragma: no cover - manual use
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.deploy_render DIRECTORY")
    sys.stdout.write(dump(render(sys.argv[1])))
