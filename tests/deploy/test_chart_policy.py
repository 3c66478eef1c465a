"""Policies the rendered chart must satisfy, checked on the objects themselves.

Hardened pods, gRPC probes, disruption budgets that never block a drain, NetworkPolicies that
allow exactly the calls the design needs, no secret in the chart, settings that point at what
the chart really created. Every test runs once per values profile.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.chart import (
    APP_UID,
    NAMESPACE,
    SERVICES,
    Manifest,
    Release,
    component_name,
    containers,
    effective_values,
    env_of,
    parse,
    pod_metadata,
    release,
    render,
    selects,
    workloads,
)

NAMESPACE_LABELS = {"kubernetes.io/metadata.name": NAMESPACE}
SERVER = "server"


def server_labels(service: str) -> dict[str, str]:
    """Labels of a service's serving pods, as the chart's Deployment templates them."""
    return {
        "app.kubernetes.io/name": service,
        "app.kubernetes.io/instance": "subsidy",
        "app.kubernetes.io/component": SERVER,
    }


def deployment_of(rel: Release, service: str) -> Manifest:
    return rel.named("Deployment", component_name(service))


def pod_labels(obj: Manifest) -> dict[str, str]:
    labels: dict[str, str] = pod_metadata(obj)["labels"]
    return labels


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


def test_deployments_have_grpc_readiness_and_liveness_probes(rel: Release) -> None:
    grpc_port = rel.effective["grpc"]["port"]
    for deployment in rel.of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == grpc_port, (
                    f"{deployment['metadata']['name']} {probe}"
                )
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


# ---- network policy ---------------------------------------------------------------------


def policies_selecting(rel: Release, labels: dict[str, str], direction: str) -> list[Manifest]:
    return [
        p
        for p in rel.of_kind("NetworkPolicy")
        if direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
    ]


def peer_is_release_pod(peer: Manifest, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicyPeer admits a pod with these labels in the release namespace."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer and not selects(peer["namespaceSelector"], NAMESPACE_LABELS):
        return False
    return selects(peer.get("podSelector", {}), labels)


def port_open(rule: Manifest, port: int) -> bool:
    return not rule.get("ports") or any(p["port"] == port for p in rule["ports"])


def may_connect(rel: Release, src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    """Kubernetes' verdict for a TCP connection between two pods of the release."""
    egress = policies_selecting(rel, src, "Egress")
    ingress = policies_selecting(rel, dst, "Ingress")
    leaves = not egress or any(
        port_open(rule, port) and any(peer_is_release_pod(peer, dst) for peer in rule["to"])
        for policy in egress
        for rule in policy["spec"].get("egress", [])
    )
    arrives = not ingress or any(
        port_open(rule, port) and any(peer_is_release_pod(peer, src) for peer in rule["from"])
        for policy in ingress
        for rule in policy["spec"].get("ingress", [])
    )
    return leaves and arrives


def networked(rel: Release) -> None:
    if not rel.effective["networkPolicy"]["enabled"]:
        pytest.skip("NetworkPolicies disabled in this profile")


def test_a_default_deny_covers_every_pod_of_the_release(rel: Release) -> None:
    networked(rel)
    deny = [
        p
        for p in rel.of_kind("NetworkPolicy")
        if set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1
    for obj, _ in workloads(rel):
        assert selects(deny[0]["spec"]["podSelector"], pod_labels(obj)), obj["metadata"]["name"]


def test_every_pod_has_an_allow_policy_besides_the_default_deny(rel: Release) -> None:
    networked(rel)
    for obj, _ in workloads(rel):
        allowing = [
            p
            for p in rel.of_kind("NetworkPolicy")
            if selects(p["spec"]["podSelector"], pod_labels(obj))
            and (p["spec"].get("ingress") or p["spec"].get("egress"))
        ]
        assert allowing, f"{obj['kind']} {obj['metadata']['name']} can reach nothing, not even DNS"


def test_no_rule_opens_a_pod_to_everyone(rel: Release) -> None:
    # An empty from/to, an empty peer or a missing port list each mean "anything".
    for policy in rel.of_kind("NetworkPolicy"):
        for direction, peers in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(direction, []):
                where = f"{policy['metadata']['name']} {direction}"
                assert rule.get(peers), where
                assert all(peer for peer in rule[peers]), where
                assert rule.get("ports"), where


def test_only_the_designed_calls_between_services_are_allowed(rel: Release) -> None:
    networked(rel)
    grpc = rel.effective["grpc"]["port"]
    designed = {("ledger", "catalog"), ("ledger", "eligibility")}
    for src in SERVICES:
        for dst in SERVICES:
            if src != dst:
                allowed = may_connect(rel, server_labels(src), server_labels(dst), grpc)
                assert allowed == ((src, dst) in designed), f"{src} -> {dst}"


def test_the_identity_simulator_is_absent_or_reachable_only_from_eligibility(
    rel: Release,
) -> None:
    networked(rel)
    if not rel.effective["identitySimulator"]["enabled"]:
        # Production talks to the real provincial platform: no simulator may be deployed.
        assert not [o for o in rel.objects if "identity-sim" in o["metadata"]["name"]]
        return
    sim = {
        "app.kubernetes.io/name": "identity-sim",
        "app.kubernetes.io/instance": "subsidy",
        "app.kubernetes.io/component": "simulator",
    }
    grpc = rel.effective["grpc"]["port"]
    for src in SERVICES:
        assert may_connect(rel, server_labels(src), sim, grpc) == (src == "eligibility"), src


Allowance = tuple[str, frozenset[tuple[int, str]]]


def allowances(rel: Release, policy: Manifest, direction: str) -> set[Allowance]:
    """A policy's rules as (who, ports): who is a role from the values, a release component,
    or an external CIDR; anything else shows up as its raw peer and fails the comparison."""
    values = rel.effective
    np = values["networkPolicy"]
    roles = {
        "platform": np["platformSelector"],
        "auditor": np["auditorSelector"],
        "prometheus": np["prometheusSelector"],
        "dns": np["dnsSelector"],
        "nats": values["nats"]["egressTo"],
        "postgresql": values["postgresql"]["egressTo"],
        "vault": values["vault"]["egressTo"],
        "otlp": values["otel"]["egressTo"],
    }
    key = "from" if direction == "ingress" else "to"
    found: set[Allowance] = set()
    for rule in policy["spec"].get(direction, []):
        ports = frozenset((p["port"], p.get("protocol", "TCP")) for p in rule["ports"])
        for peer in rule[key]:
            who = next((role for role, selector in roles.items() if peer == selector), None)
            if who is None and set(peer) == {"podSelector"}:
                labels = peer["podSelector"]["matchLabels"]
                if labels.get("app.kubernetes.io/instance") == "subsidy":
                    who = labels["app.kubernetes.io/name"]
            if who is None and set(peer) == {"ipBlock"}:
                who = f"cidr {peer['ipBlock']['cidr']}"
            found.add((who or repr(peer), ports))
    return found


def tcp(port: int) -> frozenset[tuple[int, str]]:
    return frozenset({(port, "TCP")})


def test_each_service_accepts_exactly_the_designed_callers(rel: Release) -> None:
    networked(rel)
    grpc, metrics = tcp(rel.effective["grpc"]["port"]), tcp(rel.effective["metrics"]["port"])
    expected = {
        "catalog": {("ledger", grpc)},
        "eligibility": {("platform", grpc), ("ledger", grpc)},
        "ledger": {("platform", grpc)},
        "audit": {("auditor", grpc)},
    }
    for service in SERVICES:
        policy = rel.named("NetworkPolicy", component_name(service))
        assert allowances(rel, policy, "ingress") == {
            ("prometheus", metrics),
            *expected[service],
        }, service


def test_each_service_reaches_exactly_its_dependencies(rel: Release) -> None:
    networked(rel)
    values = rel.effective
    grpc = tcp(values["grpc"]["port"])
    everyone = {
        ("dns", frozenset({(53, "UDP"), (53, "TCP")})),
        ("otlp", tcp(values["otel"]["port"])),
        ("nats", tcp(values["nats"]["port"])),
        ("postgresql", tcp(values["postgresql"]["port"])),
        ("vault", tcp(values["vault"]["port"])),
    }
    authority = values["identityAuthority"]
    if values["identitySimulator"]["enabled"]:
        identity = {("identity-sim", grpc)}
    else:
        identity = {(f"cidr {c}", tcp(authority["port"])) for c in authority["egressCIDRs"]}
    expected = {
        "catalog": set(),
        "eligibility": identity,
        "ledger": {("catalog", grpc), ("eligibility", grpc)},
        "audit": set(),
    }
    for service in SERVICES:
        policy = rel.named("NetworkPolicy", component_name(service))
        assert allowances(rel, policy, "egress") == everyone | expected[service], service


# ---- configuration and secrets --------------------------------------------------------------

SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|PRIVATE|CREDENTIAL", re.IGNORECASE)


def test_no_secret_material_is_in_the_chart(rel: Release) -> None:
    for secret in rel.of_kind("Secret"):
        assert not secret.get("data") and not secret.get("stringData"), secret["metadata"]["name"]
    settings: list[tuple[str, str]] = []
    for config in rel.of_kind("ConfigMap"):
        settings += list(config.get("data", {}).items())
    for _, spec in workloads(rel):
        for container in containers(spec):
            settings += [(e["name"], e["value"]) for e in container.get("env", []) if "value" in e]
    for name, value in settings:
        if SECRET_NAME.search(name):
            # Only pointers to files the Vault Agent renders, never the secret itself.
            assert name.endswith("_FILE"), name
            assert value.startswith(rel.effective["vault"]["injector"]["secretsDir"] + "/"), name
        if name.endswith("DATABASE_URL"):
            credentials = value.split("://", 1)[1].split("@", 1)[0]
            assert ":" not in credentials, f"{name} carries a password"


def settings_of(rel: Release, service: str) -> dict[str, str]:
    data: dict[str, str] = rel.named("ConfigMap", component_name(service))["data"]
    return data


def test_each_service_reads_its_settings_from_its_configmap(rel: Release) -> None:
    values = rel.effective
    required = {
        "SUBSIDY_GRPC_LISTEN",
        "SUBSIDY_METRICS_LISTEN",
        "SUBSIDY_LOG_LEVEL",
        "SUBSIDY_DATABASE_URL",
        "SUBSIDY_DATABASE_PASSWORD_FILE",
        "SUBSIDY_NATS_URL",
        "SUBSIDY_VAULT_ADDR",
        "SUBSIDY_VAULT_AUTH",
        "SUBSIDY_VAULT_K8S_ROLE",
        "SUBSIDY_VAULT_TRANSIT_MOUNT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
    }
    for service in SERVICES:
        settings = settings_of(rel, service)
        assert required <= set(settings), service
        assert settings["SUBSIDY_GRPC_LISTEN"].endswith(f":{values['grpc']['port']}")
        assert settings["SUBSIDY_METRICS_LISTEN"].endswith(f":{values['metrics']['port']}")
        assert settings["SUBSIDY_VAULT_AUTH"] == "kubernetes"
        assert settings["SUBSIDY_VAULT_K8S_ROLE"] == f"subsidy-{service}"
        database = values["services"][service]["database"]
        pg = values["postgresql"]
        assert settings["SUBSIDY_DATABASE_URL"].startswith(
            f"postgresql+psycopg://{database['user']}@{pg['host']}:{pg['port']}/{database['name']}"
        )
        (container,) = deployment_of(rel, service)["spec"]["template"]["spec"]["containers"]
        assert {"configMapRef": {"name": component_name(service)}} in container["envFrom"]


def resolve(rel: Release, address: str) -> Manifest:
    """The rendered Service a host:port setting points at (and check it serves that port)."""
    host, port = address.rsplit(":", 1)
    name, namespace, suffix = host.split(".", 2)
    assert (namespace, suffix) == (NAMESPACE, "svc"), address
    service = rel.named("Service", name)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}, address
    return service


def test_ledger_is_pointed_at_the_catalog_and_eligibility_services(rel: Release) -> None:
    settings = settings_of(rel, "ledger")
    for peer in ("catalog", "eligibility"):
        target = resolve(rel, settings[f"SUBSIDY_{peer.upper()}_ADDR"])
        assert target["spec"]["selector"] == server_labels(peer)
    for other in ("catalog", "eligibility", "audit"):
        assert "SUBSIDY_CATALOG_ADDR" not in settings_of(rel, other)


def test_eligibility_is_pointed_at_the_authority_or_the_simulator(rel: Release) -> None:
    address = settings_of(rel, "eligibility")["SUBSIDY_IDENTITY_AUTHORITY_ADDR"]
    if rel.effective["identitySimulator"]["enabled"]:
        assert resolve(rel, address)["metadata"]["name"] == component_name("identity-sim")
    else:
        assert address == rel.effective["identityAuthority"]["address"]


def test_the_simulator_exists_only_when_enabled(rel: Release) -> None:
    runs_sim = [
        obj
        for obj, spec in workloads(rel)
        if any(c.get("args", [None])[0] == "services.identity_sim" for c in spec["containers"])
    ]
    named_sim = [o for o in rel.objects if "identity-sim" in o["metadata"]["name"]]
    if rel.effective["identitySimulator"]["enabled"]:
        assert len(runs_sim) == 1
        assert {o["kind"] for o in named_sim} >= {"Deployment", "Service", "PodDisruptionBudget"}
        assert "SIMULATOR is enabled" in rel.notes
    else:
        assert runs_sim == [] and named_sim == []


def container_settings(rel: Release, container: Manifest) -> dict[str, str]:
    """What a container sees as plain settings: its ConfigMap envFrom, then its literal env."""
    seen: dict[str, str] = {}
    for source in container.get("envFrom", []):
        seen.update(rel.named("ConfigMap", source["configMapRef"]["name"])["data"])
    seen.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return seen


def test_every_database_client_trusts_the_ca_bundle_it_mounts(rel: Release) -> None:
    bundle = rel.effective["caBundle"]
    for obj, spec in workloads(rel):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            settings = container_settings(rel, container)
            talks_to_db = any(name.endswith("DATABASE_URL") for name in settings)
            trusted = {
                settings[k] for k in ("PGSSLROOTCERT", "REQUESTS_CA_BUNDLE") if k in settings
            }
            if not bundle["configMapName"] or not talks_to_db:
                assert not trusted, obj["metadata"]["name"]
                continue
            (path,) = trusted
            mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
            (mount,) = mounts
            config_map = volumes[mount["name"]]["configMap"]
            assert config_map["name"] == bundle["configMapName"], obj["metadata"]["name"]
            assert path.rsplit("/", 1)[1] in {item["path"] for item in config_map["items"]}


def vault_annotations(obj: Manifest, prefix: str) -> dict[str, str]:
    annotations: dict[str, str] = pod_metadata(obj).get("annotations", {})
    return {k.removeprefix(prefix + "/"): v for k, v in annotations.items() if k.startswith(prefix)}


def test_vault_agent_renders_each_services_database_password(rel: Release) -> None:
    vault = rel.effective["vault"]
    prefix = vault["injector"]["annotationPrefix"]
    for service in SERVICES:
        settings = settings_of(rel, service)
        path = rel.effective["services"][service]["database"]["passwordVaultPath"]
        annotations = vault_annotations(deployment_of(rel, service), prefix)
        assert annotations["agent-inject"] == "true"
        assert annotations["role"] == settings["SUBSIDY_VAULT_K8S_ROLE"]
        assert annotations["agent-inject-secret-db-password"] == path
        assert f'secret "{path}"' in annotations["agent-inject-template-db-password"]
        # The injector writes agent-inject-secret-<name> to <secretsDir>/<name>.
        assert (
            settings["SUBSIDY_DATABASE_PASSWORD_FILE"]
            == f"{vault['injector']['secretsDir']}/db-password"
        )
        # Serving pods keep the agent running so a rotated password is re-rendered.
        assert annotations["agent-pre-populate-only"] == "false"


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
        assert config["data"] == settings_of(rel, service), "migrations see the service's settings"


def test_backup_cronjob_renders_only_when_enabled(rel: Release) -> None:
    cronjobs = rel.of_kind("CronJob")
    if not rel.effective["backup"]["enabled"]:
        assert cronjobs == []
        return
    (cronjob,) = cronjobs
    spec = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert [*container["command"], *container["args"]] == [
        "subsidyctl",
        "backup",
        "--to",
        "/backup",
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
