"""Policies the rendered chart must satisfy, checked on the objects themselves.

Hardened pods, mutual-TLS health probes, disruption budgets that never block a drain, migrations
and backups as hooks and jobs, the values profiles. NetworkPolicies are checked in
test_chart_network.py, the settings and secrets in test_chart_settings.py, the flows against
services/kernel/topology.py in test_chart_topology.py, certificates in test_chart_tls.py. Every
test runs once per values profile.
"""

from __future__ import annotations

import re
from typing import Any

from tests.deploy.chart import (
    APP_UID,
    SERVICES,
    Manifest,
    Release,
    component_name,
    containers,
    deployment_of,
    effective_values,
    env_of,
    parse,
    pod_labels,
    release,
    render,
    selects,
    server_labels,
    settings_of,
    vault_annotations,
    workloads,
)

# ---- pods ------------------------------------------------------------------------------


def test_every_container_runs_hardened(rel: Release) -> None:
    for obj, spec in workloads(rel):
        what = f"{obj['kind']} {obj['metadata']['name']}"
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, what
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", what
        for container in containers(spec):
            ctx = container["securityContext"]
            where = f"{what} container {container['name']}"
            assert ctx["runAsNonRoot"] is True, where
            assert ctx["runAsUser"] == APP_UID, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx.get("privileged", False) is False, where
            assert ctx["capabilities"]["drop"] == ["ALL"], where
            assert not ctx["capabilities"].get("add"), where
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault", where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where


def test_every_pod_gets_a_writable_tmp_and_nothing_else_from_the_host(rel: Release) -> None:
    for obj, spec in workloads(rel):
        what = f"{obj['kind']} {obj['metadata']['name']}"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert not any("hostPath" in v for v in volumes.values()), what
        assert spec.get("hostNetwork", False) is False, what
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], what


def test_no_pod_gets_service_link_variables(rel: Release) -> None:
    # Service links would inject SUBSIDY_<SERVICE>_PORT=tcp://... into the settings namespace.
    for obj, spec in workloads(rel):
        assert spec["enableServiceLinks"] is False, obj["metadata"]["name"]


def test_deployments_have_mutual_tls_readiness_and_liveness_probes(rel: Release) -> None:
    # Native gRPC probes cannot present a client certificate; the exec probe asks the same
    # grpc.health.v1 on the serving port with the pod's own (test_chart_tls.py checks the rest).
    grpc_port = rel.effective["grpc"]["port"]
    for deployment in rel.of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                command = container[probe]["exec"]["command"]
                assert command[:3] == ["python", "-m", "services.kernel.probe"]
                assert command[command.index("--addr") + 1] == f"127.0.0.1:{grpc_port}", (
                    f"{deployment['metadata']['name']} {probe}"
                )
                assert "grpc" not in container[probe]
            served = {p["containerPort"] for p in container["ports"] if p["name"] == "grpc"}
            assert served == {grpc_port}


def test_each_service_runs_its_own_module_and_serves_both_ports(rel: Release) -> None:
    for service in SERVICES:
        (container,) = deployment_of(rel, service)["spec"]["template"]["spec"]["containers"]
        assert container["args"] == [f"services.{service}", "serve"]
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
            "grpc": rel.effective["grpc"]["port"],
            "metrics": rel.effective["metrics"]["port"],
        }


def test_otel_service_name_comes_from_the_pod_label(rel: Release) -> None:
    for obj, spec in workloads(rel):
        labels = pod_labels(obj)
        for container in spec["containers"]:
            env = env_of(container)
            field = env["OTEL_SERVICE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == "metadata.labels['app.kubernetes.io/name']"
            assert labels["app.kubernetes.io/name"], obj["metadata"]["name"]
            attributes = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
            assert "service.namespace=subsidy" in attributes
            # $(VAR) only expands for variables defined earlier in the list.
            names = list(env)
            for ref in re.findall(r"\$\((\w+)\)", attributes):
                assert names.index(ref) < names.index("OTEL_RESOURCE_ATTRIBUTES"), ref


# ---- availability ------------------------------------------------------------------------


def replicas_floor(rel: Release, deployment: Manifest) -> int:
    """The fewest replicas a Deployment runs: the HPA's minimum when one targets it."""
    for hpa in rel.of_kind("HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]:
            assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
            floor: int = hpa["spec"]["minReplicas"]
            return floor
    replicas: int = deployment["spec"]["replicas"]
    return replicas


def budget_count(value: int | str, replicas: int) -> int:
    if isinstance(value, str) and value.endswith("%"):
        return int(value[:-1]) * replicas // 100
    return int(value)


def test_every_deployment_has_a_pdb_selecting_its_pods(rel: Release) -> None:
    for deployment in rel.of_kind("Deployment"):
        labels = pod_labels(deployment)
        budgets = [
            pdb
            for pdb in rel.of_kind("PodDisruptionBudget")
            if selects(pdb["spec"]["selector"], labels)
        ]
        assert len(budgets) == 1, deployment["metadata"]["name"]


def test_no_pdb_blocks_a_node_drain(rel: Release) -> None:
    for deployment in rel.of_kind("Deployment"):
        labels = pod_labels(deployment)
        (pdb,) = (
            p for p in rel.of_kind("PodDisruptionBudget") if selects(p["spec"]["selector"], labels)
        )
        replicas = replicas_floor(rel, deployment)
        spec = pdb["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec), "exactly one of the two"
        if "minAvailable" in spec:
            assert budget_count(spec["minAvailable"], replicas) < replicas, pdb["metadata"]["name"]
        else:
            assert budget_count(spec["maxUnavailable"], replicas) >= 1, pdb["metadata"]["name"]


def test_hpas_target_the_deployments_and_scale_on_cpu(rel: Release) -> None:
    names = {d["metadata"]["name"] for d in rel.of_kind("Deployment")}
    for hpa in rel.of_kind("HorizontalPodAutoscaler"):
        spec = hpa["spec"]
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        assert spec["scaleTargetRef"]["name"] in names
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
        assert spec["metrics"][0]["resource"]["name"] == "cpu"


def test_services_select_the_serving_pods_on_named_ports(rel: Release) -> None:
    for service in SERVICES:
        svc = rel.named("Service", component_name(service))
        assert svc["spec"]["selector"] == server_labels(service)
        pods = [
            d
            for d in rel.of_kind("Deployment")
            if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(d))
        ]
        assert [p["metadata"]["name"] for p in pods] == [component_name(service)]
        container_ports = {
            p["name"] for p in pods[0]["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports


# ---- migrations and backups ---------------------------------------------------------------


def hook(obj: Manifest) -> tuple[set[str], int, set[str]]:
    annotations = obj["metadata"].get("annotations", {})
    return (
        set(annotations.get("helm.sh/hook", "").split(",")) - {""},
        int(annotations.get("helm.sh/hook-weight", "0")),
        set(annotations.get("helm.sh/hook-delete-policy", "").split(",")) - {""},
    )


def test_each_service_migrates_in_a_pre_install_and_pre_upgrade_hook(rel: Release) -> None:
    prefix = rel.effective["vault"]["injector"]["annotationPrefix"]
    for service in SERVICES:
        name = component_name(f"{service}-migrate")
        job = rel.named("Job", name)
        events, job_weight, deletion = hook(job)
        assert events == {"pre-install", "pre-upgrade"}
        assert deletion == {"before-hook-creation", "hook-succeeded"}
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["args"] == [f"services.{service}", "migrate"]
        assert spec["restartPolicy"] == "Never"
        # A long-running agent sidecar would keep the Job from ever completing.
        assert vault_annotations(job, prefix)["agent-pre-populate-only"] == "true"
        # A pre-install hook runs before the release's own objects exist: the Job's
        # ServiceAccount and settings must be hooks that run before it.
        account = rel.named("ServiceAccount", spec["serviceAccountName"])
        config = rel.named("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])
        for dependency in (account, config):
            dep_events, dep_weight, _ = hook(dependency)
            assert dep_events == events and dep_weight < job_weight, dependency["metadata"]["name"]
        # Migrations see the service's settings plus the role that owns the schema, whose
        # password the Vault Agent renders for the Job alone.
        database = rel.effective["services"][service]["database"]
        secrets_dir = rel.effective["vault"]["injector"]["secretsDir"]
        pg = rel.effective["postgresql"]
        assert config["data"] == {
            **settings_of(rel, service),
            "SUBSIDY_MIGRATION_DATABASE_URL": (
                f"postgresql+psycopg://{database['migrationUser']}@{pg['host']}:{pg['port']}"
                f"/{database['name']}?sslmode={pg['sslmode']}"
            ),
            "SUBSIDY_MIGRATION_DATABASE_PASSWORD_FILE": f"{secrets_dir}/db-migration-password",
        }
        annotations = vault_annotations(job, prefix)
        path = database["migrationPasswordVaultPath"]
        assert annotations["agent-inject-secret-db-migration-password"] == path
        assert f'secret "{path}"' in annotations["agent-inject-template-db-migration-password"]
        assert annotations["agent-inject-perms-db-migration-password"] == "0400"
        # A serving pod never gets the migration role's URL or password.
        serving = vault_annotations(deployment_of(rel, service), prefix)
        assert not any("migration" in key for key in serving)
        assert not any("MIGRATION" in key for key in settings_of(rel, service))


def test_backup_cronjob_renders_only_when_enabled(rel: Release) -> None:
    cronjobs = rel.of_kind("CronJob")
    if not rel.effective["backup"]["enabled"]:
        assert cronjobs == []
        return
    (cronjob,) = cronjobs
    spec = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    # The command line is parsed with the CLI's own options in test_chart_backup.py.
    assert [*container["command"], *container["args"]] == [
        "subsidyctl",
        "backup",
        "--out",
        "/backup",
        "--dated",
        "--keep",
        str(rel.effective["backup"]["keep"]),
        "--stored-checkpoint",
        "--json",
    ]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts["/backup"]]["persistentVolumeClaim"]["claimName"]
    pvc = rel.named("PersistentVolumeClaim", claim)
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_backup_uses_an_existing_claim_without_creating_one() -> None:
    values: dict[str, Any] = {
        "backup": {"enabled": True, "persistence": {"existingClaim": "vault-backups"}}
    }
    objects = parse(render(values))
    assert [o for o in objects if o["kind"] == "PersistentVolumeClaim"] == []
    (cronjob,) = [o for o in objects if o["kind"] == "CronJob"]
    volumes = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "backup", "persistentVolumeClaim": {"claimName": "vault-backups"}} in volumes


# ---- profiles ------------------------------------------------------------------------------


def test_a_service_override_changes_that_service_only() -> None:
    values: dict[str, Any] = {
        "services": {"ledger": {"autoscaling": {"enabled": False}, "replicas": 5}},
    }
    objects = parse(render(values))
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    hpas = {o["metadata"]["name"] for o in objects if o["kind"] == "HorizontalPodAutoscaler"}
    assert deployments[component_name("ledger")]["spec"]["replicas"] == 5
    assert component_name("ledger") not in hpas
    assert {component_name(s) for s in ("catalog", "eligibility", "audit")} <= hpas
    defaults = effective_values(values)["serviceDefaults"]["autoscaling"]
    assert defaults["enabled"] is True, "the override must not leak into the defaults"


def test_production_runs_three_replicas_spread_over_nodes() -> None:
    rel = release("production")
    for service in SERVICES:
        deployment = deployment_of(rel, service)
        assert replicas_floor(rel, deployment) == 3
        hpa = rel.named("HorizontalPodAutoscaler", component_name(service))
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
        assert (
            rel.named("PodDisruptionBudget", component_name(service))["spec"]["minAvailable"] == 2
        )
        spec = deployment["spec"]["template"]["spec"]
        (term,) = spec["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == server_labels(service)
        (spread,) = spec["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["labelSelector"]["matchLabels"] == server_labels(service)
    assert not rel.effective["identitySimulator"]["enabled"]


def test_dev_runs_one_replica_that_can_always_be_drained() -> None:
    rel = release("dev")
    assert rel.of_kind("HorizontalPodAutoscaler") == []
    for service in SERVICES:
        assert deployment_of(rel, service)["spec"]["replicas"] == 1
        pdb = rel.named("PodDisruptionBudget", component_name(service))["spec"]
        assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb
    assert rel.effective["identitySimulator"]["enabled"]
