"""The chart's backup CronJob runs a command the CLI really has: its command line is parsed by
``subsidyctl``'s own Click command (a renamed or removed flag fails here), every variable it
sets is one the CLI reads (services.kernel.settings.CliSettings), the database URLs name each
service's migration role with the password file the Vault Agent renders, and every object is
valid Kubernetes."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import typer

from services.kernel.settings import CliSettings
from subsidyctl.cli import app
from tests.deploy.chart import KUBE_VERSION, SERVICES, Manifest, effective_values, parse, render

ON: dict[str, Any] = {"backup": {"enabled": True, "keep": 7}}


def _cronjob(values: dict[str, Any]) -> tuple[list[Manifest], Manifest, Manifest]:
    objects = parse(render(values))
    (cronjob,) = [o for o in objects if o["kind"] == "CronJob"]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return objects, cronjob, container


def _parse_cli(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """``argv`` (after ``subsidyctl``) parsed by the CLI itself: the subcommand and its
    parameters. Raises Click's UsageError (which Typer bundles) for an option the command
    does not have."""
    group = typer.main.get_command(app)
    name, *rest = argv
    command = group.get_command(typer.Context(group), name)  # type: ignore[attr-defined]
    assert command is not None, f"subsidyctl has no command {name!r}"
    ctx = command.make_context(f"subsidyctl {name}", list(rest), resilient_parsing=False)
    return name, dict(ctx.params)


def test_the_cronjob_runs_backup_with_options_the_cli_has() -> None:
    objects, cronjob, container = _cronjob(ON)
    assert container["command"] == ["subsidyctl"]
    name, params = _parse_cli(container["args"])
    assert name == "backup"
    assert str(params["out"]) == "/backup"
    assert params["dated"] is True and params["keep"] == 7
    assert params["stored_checkpoint"] is True  # no client certificate for the audit service
    assert params["json_only"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/backup"] == "backup"
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_the_check_fails_for_a_flag_the_cli_does_not_have() -> None:
    """What the test above relies on: the CLI's parser refuses an unknown flag."""
    with pytest.raises(Exception, match="No such option: --to"):
        _parse_cli(["backup", "--to", "/backup"])


def test_the_cronjob_sets_only_variables_the_cli_reads() -> None:
    _, _, container = _cronjob(ON)
    env = {e["name"]: e.get("value") for e in container["env"]}
    ours = {n for n in env if n.startswith("SUBSIDY_")}
    declared = {v.name for v in CliSettings.variables()}
    assert ours <= declared, ours - declared
    # the CronJob needs no setting a service reads but the CLI does not (it used to pass some)
    assert "SUBSIDY_VAULT_AUTH" not in env and "SUBSIDY_LOG_LEVEL" not in env
    effective = effective_values(ON)
    assert env["SUBSIDY_VAULT_K8S_ROLE"] == effective["backup"]["vaultRole"]
    assert env["SUBSIDY_VAULT_ADDR"] == effective["vault"]["address"]
    secrets_dir = effective["vault"]["injector"]["secretsDir"]
    for service in SERVICES:
        db = effective["services"][service]["database"]
        url = env[f"SUBSIDY_{service.upper()}_MIGRATION_DATABASE_URL"]
        assert url.startswith(f"postgresql+psycopg://{db['migrationUser']}@")
        assert f"/{db['name']}?sslmode=" in url
        password_file = env[f"SUBSIDY_{service.upper()}_MIGRATION_DATABASE_PASSWORD_FILE"]
        assert password_file == f"{secrets_dir}/db-migration-password-{service}"


def test_the_vault_agent_renders_each_migration_password_where_the_cli_reads_it() -> None:
    _, cronjob, _ = _cronjob(ON)
    annotations = cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["annotations"]
    effective = effective_values(ON)
    prefix = effective["vault"]["injector"]["annotationPrefix"]
    for service in SERVICES:
        path = effective["services"][service]["database"]["migrationPasswordVaultPath"]
        key = f"{prefix}/agent-inject-secret-db-migration-password-{service}"
        assert annotations[key] == path


def test_the_backup_is_off_by_default() -> None:
    assert effective_values({})["backup"]["enabled"] is False
    assert [o for o in parse(render({})) if o["kind"] == "CronJob"] == []
