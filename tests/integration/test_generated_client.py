"""A client generated from the running gateway's /openapi.json by a generator nobody here wrote.

openapi-python-client (a pinned dev dependency) generates a package from the served
document; the test imports it and calls every operation the document has, over real
HTTP against a gateway and the simulator, and asserts typed results: model instances
(``AnalysisV1``, ``UsageReport``, ``Problem``, …), never bare dicts. A new operation that
is not called here fails the test: add it to ``CALLS``.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, Sim, unique_image

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
PACKAGE = "facegate_client"
#: The generator supports multipart and application/octet-stream bodies, not image/*: raw uploads
#: go as application/octet-stream, which the document also declares. Nothing else may be skipped.
EXPECTED_WARNINGS = {f"Unsupported content type image/{kind}" for kind in ("jpeg", "png", "bmp")}


@pytest.fixture(scope="module")
def client_package(shared_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    out = tmp_path_factory.mktemp("generated")
    config = out / "config.yaml"
    config.write_text(f"project_name_override: facegate-client\npackage_name_override: {PACKAGE}\n")
    result = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--url",
            f"{shared_gateway.url}/openapi.json",
            "--config",
            str(config),
            "--meta",
            "none",
            "--output-path",
            str(out / PACKAGE),
        ],
        capture_output=True,
        text=True,
        cwd=out,
        timeout=120,
        check=False,
        # Its post-generation hook runs ruff, which is in our venv.
        env={**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    warnings = {line.strip() for line in output.splitlines() if line.startswith("Unsupported")}
    assert warnings <= EXPECTED_WARNINGS, output
    assert "ruff is not in PATH" not in output
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _api(package: ModuleType, tag: str, operation: str) -> Any:
    return importlib.import_module(f"{package.__name__}.api.{tag}.{operation}")


def _models(package: ModuleType) -> Any:
    return importlib.import_module(f"{package.__name__}.models")


def _file(package: ModuleType, data: bytes, name: str = "photo.jpg", mime: str = "image/jpeg") -> Any:
    types = importlib.import_module(f"{package.__name__}.types")
    return types.File(payload=io.BytesIO(data), file_name=name, mime_type=mime)


# --- one check per operation, named by operationId ----------------------------------------------


def analyze_faces(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "faces", "analyze_faces")
    image = unique_image(sim="faces=2")
    form = op.sync_detailed(client=client, body=models.ImageForm(image=_file(pkg, image)), landmarks=True)
    assert form.status_code == 200
    analysis = form.parsed
    assert isinstance(analysis, models.AnalysisV1)
    assert analysis.image.sha256 == hashlib.sha256(image).hexdigest()
    assert len(analysis.faces) == 2
    assert all(isinstance(face, models.Face) for face in analysis.faces)
    assert isinstance(analysis.faces[0].box, models.Box)
    assert isinstance(analysis.source, models.Source)
    assert isinstance(analysis.source.analyzed_at, datetime)
    assert form.headers["Cache-Status"].startswith("facegate")

    raw = unique_image(sim="faces=1")  # the raw body: Content-Type application/octet-stream
    answer = op.sync(client=client, body=_file(pkg, raw), cache_control="no-store", x_request_id="gen-client-1")
    assert isinstance(answer, models.AnalysisV1)
    assert answer.request_id == "gen-client-1"
    assert len(answer.faces) == 1

    refused = op.sync_detailed(client=client, body=models.ImageForm(image=_file(pkg, b"GIF89a" + b"\0" * 64)))
    assert refused.status_code == 415
    assert isinstance(refused.parsed, models.Problem)
    assert refused.parsed.code == "unsupported_media_type"


def get_analysis(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "faces", "get_analysis")
    image = unique_image(sim="faces=1")
    assert gw.analyze(image).status_code == 200
    found = op.sync(client=client, sha256=hashlib.sha256(image).hexdigest())
    assert isinstance(found, models.AnalysisV1)
    assert found.source.cached is True
    missing = op.sync_detailed(client=client, sha256="0" * 64)
    assert missing.status_code == 404
    assert isinstance(missing.parsed, models.Problem)
    assert missing.parsed.code == "not_found"


def delete_analysis(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "faces", "delete_analysis")
    image = unique_image(sim="faces=1")
    assert gw.analyze(image).status_code == 200
    sha256 = hashlib.sha256(image).hexdigest()
    deleted = op.sync_detailed(client=client, sha256=sha256)
    assert deleted.status_code == 204
    assert deleted.parsed is None
    again = op.sync_detailed(client=client, sha256=sha256)
    assert again.status_code == 404
    assert isinstance(again.parsed, models.Problem)
    assert again.parsed.code == "not_found"


def get_usage(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "usage", "get_usage")
    usage = op.sync(client=client)
    assert isinstance(usage, models.UsageReport)
    assert usage.tenant == "alpha"
    assert isinstance(usage.quotas.daily, models.UsageQuota)
    assert isinstance(usage.quotas.monthly.reset_at, datetime)
    assert isinstance(usage.rate_limit, models.UsageRateLimit)
    assert all(isinstance(p, models.UsagePolicy) for p in usage.policies)
    assert isinstance(usage.cache.day, models.UsageCacheCounts)
    assert isinstance(usage.credits_spent, models.UsageCredits)
    refused = op.sync_detailed(client=anonymous)
    assert refused.status_code == 401
    assert isinstance(refused.parsed, models.Problem)
    assert refused.parsed.code == "unauthorized"


def get_usage_history(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "usage", "get_usage_history")
    assert gw.analyze(unique_image(sim="faces=1")).status_code == 200
    history = op.sync(client=client)
    assert isinstance(history, models.UsageHistory)
    [mine] = history.tenants
    assert isinstance(mine, models.TenantHistory)
    assert mine.tenant == "alpha"
    assert isinstance(mine.totals, models.HistoryCounts)
    assert all(isinstance(day, models.HistoryDay) for day in mine.days)
    assert mine.totals.billable_calls >= 1  # (`credits` is `credits_` in Python: a builtin)
    other = op.sync_detailed(client=client, tenant="beta")
    assert other.status_code == 403
    assert isinstance(other.parsed, models.Problem)
    assert other.parsed.code == "operator_required"


def get_schema(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "schema", "get_schema")
    schema = op.sync(client=anonymous)
    assert isinstance(schema, models.JsonSchemaDocument)
    assert schema.title == "AnalysisV1"
    assert "faces" in schema.properties.additional_properties


def analyze_faces_ailabapi(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "ailabapi_compatible", "analyze_faces_ailabapi")
    answer = op.sync(client=client, body=models.ImageForm(image=_file(pkg, unique_image(sim="faces=1"))))
    assert isinstance(answer, models.AilabapiAnalysis)
    assert answer.error_code == 0
    assert answer.face_detail_infos is not None and len(answer.face_detail_infos) == 1
    refused = op.sync_detailed(client=client, body=models.ImageForm(image=_file(pkg, b"GIF89a" + b"\0" * 64)))
    assert refused.status_code == 415
    assert isinstance(refused.parsed, models.AilabapiError)
    assert refused.parsed.error_detail.code == "UNSUPPORTED_FILE_TYPES"
    assert refused.headers["X-Facegate-Error"] == "unsupported_media_type"


def get_health(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "operations", "get_health")
    health = op.sync(client=anonymous)
    assert isinstance(health, models.Health)
    assert health.status == "ok"


def get_readiness(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "operations", "get_readiness")
    ready = op.sync(client=anonymous)
    assert isinstance(ready, models.Readiness)
    assert isinstance(ready.checks, models.ReadinessChecks)
    assert ready.checks.additional_properties["tenants"] == "ok"


def _operator(pkg: ModuleType, gw: Gateway) -> Any:
    return pkg.AuthenticatedClient(base_url=gw.url, token=gw.key("operator:ops"), timeout=httpx.Timeout(30))


def list_tenants(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "admin", "list_tenants")
    with _operator(pkg, gw) as operator:
        listing = op.sync(client=operator)
    assert isinstance(listing, models.TenantsList)
    assert {t.name for t in listing.tenants} == {"alpha", "beta"}
    assert all(isinstance(t.limits, models.TenantLimitsModel) for t in listing.tenants)
    refused = op.sync_detailed(client=client)  # a tenant key
    assert refused.status_code == 403
    assert isinstance(refused.parsed, models.Problem)
    assert refused.parsed.code == "operator_required"


def purge_tenant(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "admin", "purge_tenant")
    assert gw.analyze(unique_image(sim="faces=1"), tenant="beta").status_code == 200
    with _operator(pkg, gw) as operator:
        result = op.sync(client=operator, tenant="beta")
    assert isinstance(result, models.PurgeResult)
    assert result.deleted >= 1
    assert isinstance(result.replicas, models.Replicas)


def delete_tenant_analysis(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "admin", "delete_tenant_analysis")
    image = unique_image(sim="faces=1")
    assert gw.analyze(image, tenant="beta").status_code == 200
    with _operator(pkg, gw) as operator:
        result = op.sync(client=operator, tenant="beta", sha256=hashlib.sha256(image).hexdigest())
    assert isinstance(result, models.PurgeResult)
    assert result.deleted == 1


def purge_image(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "admin", "purge_image")
    image = unique_image(sim="faces=1")
    assert gw.analyze(image).status_code == 200
    assert gw.analyze(image, tenant="beta").status_code == 200
    with _operator(pkg, gw) as operator:
        result = op.sync(client=operator, sha256=hashlib.sha256(image).hexdigest())
    assert isinstance(result, models.PurgeResult)
    assert result.deleted == 2


def get_tenant_usage(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "admin", "get_tenant_usage")
    with _operator(pkg, gw) as operator:
        usage = op.sync(client=operator, tenant="beta")
        missing = op.sync_detailed(client=operator, tenant="nobody")
    assert isinstance(usage, models.UsageReport)
    assert usage.tenant == "beta"
    assert missing.status_code == 404
    assert isinstance(missing.parsed, models.Problem)


def get_upstream_keys(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    models, op = _models(pkg), _api(pkg, "admin", "get_upstream_keys")
    with _operator(pkg, gw) as operator:
        view = op.sync(client=operator)
    assert isinstance(view, models.UpstreamKeysView)
    (key,) = view.keys
    assert isinstance(key, models.UpstreamKeyModel)
    assert (key.name, key.tier, view.gated) == ("default", "primary", False)


def get_metrics(pkg: ModuleType, client: Any, anonymous: Any, gw: Gateway) -> None:
    text = _api(pkg, "operations", "get_metrics").sync(client=anonymous)
    assert isinstance(text, str)
    assert "facegate_http_requests_total" in text


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(word.title() for word in rest)


CALLS: dict[str, Callable[[ModuleType, Any, Any, Gateway], None]] = {
    _camel(fn.__name__): fn
    for fn in (
        analyze_faces,
        get_analysis,
        delete_analysis,
        get_usage,
        get_usage_history,
        get_schema,
        analyze_faces_ailabapi,
        get_health,
        get_readiness,
        get_metrics,
        list_tenants,
        purge_tenant,
        delete_tenant_analysis,
        purge_image,
        get_tenant_usage,
        get_upstream_keys,
    )
}


def test_every_operation_is_called() -> None:
    from app.main import create_app

    document = create_app().openapi()
    operations = {op["operationId"] for methods in document["paths"].values() for op in methods.values()}
    assert set(CALLS) == operations


@pytest.mark.parametrize("operation", sorted(CALLS))
def test_generated_client_calls_operation(
    operation: str, client_package: ModuleType, gateway: Gateway, sim: Sim
) -> None:
    timeout = httpx.Timeout(30)
    with (
        client_package.AuthenticatedClient(base_url=gateway.url, token=gateway.key(), timeout=timeout) as client,
        client_package.Client(base_url=gateway.url, timeout=timeout) as anonymous,
    ):
        CALLS[operation](client_package, client, anonymous, gateway)
