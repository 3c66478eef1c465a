"""Settings and secrets of the rendered chart: no secret in it, every variable a service needs
(derived from services.kernel.settings) in its ConfigMap, pointing at what the chart created.
Every test runs once per values profile.
"""

from __future__ import annotations

import re

import pytest

from services.kernel.settings import LIBRARY_VARIABLES, Settings, SimulatorSettings, Variable
from tests.deploy.chart import (
    PROFILES,
    SERVICES,
    Manifest,
    Release,
    component_name,
    containers,
    deployment_of,
    env_of,
    release,
    resolve,
    server_labels,
    settings_of,
    vault_annotations,
    workloads,
)


def deployed_variables(service: str) -> set[str]:
    """What a deployment must give ``service``, as Settings declares it: every required
    variable and every one each deployment sets (Kubernetes auth, the password file, metrics),
    its peers' addresses from the topology, and the library variables a cluster needs."""
    declared = (*Settings.variables_of(service), *LIBRARY_VARIABLES)
    return {v.name for v in declared if v.required or v.deployed}


def known_variables(declared: tuple[Variable, ...]) -> set[str]:
    return {v.name for v in (*declared, *LIBRARY_VARIABLES)}


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


def test_each_service_reads_its_settings_from_its_configmap(rel: Release) -> None:
    values = rel.effective
    for service in SERVICES:
        settings = settings_of(rel, service)
        assert deployed_variables(service) <= set(settings), service
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


def test_every_setting_the_chart_gives_a_service_is_one_it_reads(rel: Release) -> None:
    """The other direction: a key no Settings field reads is a typo or a leftover (a peer's
    address the service does not call, a variable renamed in the code)."""
    for service in SERVICES:
        stray = set(settings_of(rel, service)) - known_variables(Settings.variables_of(service))
        assert not stray, f"{service} is given settings it never reads: {sorted(stray)}"


# Only the profiles that deploy the simulator: elsewhere there is no container to look at.
SIMULATOR_PROFILES = sorted(
    p for p in PROFILES if release(p).effective["identitySimulator"]["enabled"]
)


@pytest.mark.parametrize("profile", SIMULATOR_PROFILES)
def test_the_simulator_gets_exactly_what_its_settings_read(profile: str) -> None:
    rel = release(profile)
    (container,) = deployment_of(rel, "identity-sim")["spec"]["template"]["spec"]["containers"]
    # K8S_* exist only to be expanded into OTEL_RESOURCE_ATTRIBUTES ($(VAR) references).
    given = {name for name in env_of(container) if not name.startswith("K8S_")}
    declared = (*SimulatorSettings.variables(), *LIBRARY_VARIABLES)
    needed = {v.name for v in declared if v.required or v.deployed}
    assert needed <= given
    assert given <= known_variables(SimulatorSettings.variables()), sorted(given)
