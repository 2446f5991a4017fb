"""The CloudFormation templates in deploy/ecs: cfn-lint, then what cfn-lint cannot know.

cfn-lint checks each resource against the CloudFormation schemas. It does not know that the
drain must end before ECS kills the task, that the load balancer must not cut a socket between
two pings, that every HUBGATE_* variable must be one hubgate reads, or that a Cognito user must
never pick their own tenant; these tests do.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hubgate.settings import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "ecs"
HUB = DEPLOY / "hub.yaml"
SPOKE = DEPLOY / "spoke.yaml"

FARGATE_MAX_STOP_TIMEOUT = 120  # seconds; ECS ContainerDefinition.stopTimeout on Fargate
ALB_IDLE_TIMEOUT_RANGE = (1, 4000)  # seconds; ALB attribute idle_timeout.timeout_seconds


# ---------------------------------------------------------------------------- loading


class CloudFormationLoader(yaml.SafeLoader):
    """YAML with the short-form intrinsic functions, turned into their long form."""


def _intrinsic(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = tag_suffix
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if name == "Ref":
        return {"Ref": value}
    if name == "Condition":
        return {"Condition": value}
    if name == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{name}": value}


CloudFormationLoader.add_multi_constructor("!", _intrinsic)


def load(path: Path) -> dict[str, Any]:
    template: dict[str, Any] = yaml.load(path.read_text(), Loader=CloudFormationLoader)
    return template


@pytest.fixture(scope="module")
def hub() -> dict[str, Any]:
    return load(HUB)


@pytest.fixture(scope="module")
def spoke() -> dict[str, Any]:
    return load(SPOKE)


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r["Properties"] for name, r in template["Resources"].items() if r["Type"] == kind}


def only(template: dict[str, Any], kind: str) -> dict[str, Any]:
    found = resources(template, kind)
    assert len(found) == 1, f"expected one {kind}, found {sorted(found)}"
    return next(iter(found.values()))


def branches(item: Any) -> Iterator[Any]:
    """An item of a list, or both branches of an Fn::If item (AWS::NoValue dropped)."""
    if isinstance(item, dict) and "Fn::If" in item:
        for branch in item["Fn::If"][1:]:
            yield from branches(branch)
    elif item != {"Ref": "AWS::NoValue"}:
        yield item


def items(value: Any) -> list[Any]:
    return [entry for item in value for entry in branches(item)]


def container(hub: dict[str, Any]) -> dict[str, Any]:
    (definition,) = only(hub, "AWS::ECS::TaskDefinition")["ContainerDefinitions"]
    return definition


def parameter(template: dict[str, Any], ref: Any) -> dict[str, Any]:
    assert isinstance(ref, dict) and set(ref) == {"Ref"}, f"expected a parameter reference: {ref}"
    spec: dict[str, Any] = template["Parameters"][ref["Ref"]]
    return spec


def environment(hub: dict[str, Any]) -> dict[str, Any]:
    return {entry["Name"]: entry["Value"] for entry in items(container(hub)["Environment"])}


def upper_bound(template: dict[str, Any], value: Any) -> float:
    """A literal, or the largest value a Number parameter accepts."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return float(value)
    return float(parameter(template, value)["MaxValue"])


def lower_bound(template: dict[str, Any], value: Any) -> float:
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return float(value)
    return float(parameter(template, value)["MinValue"])


def default(template: dict[str, Any], value: Any) -> float:
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return float(value)
    return float(parameter(template, value)["Default"])


# ---------------------------------------------------------------------------- cfn-lint


@pytest.mark.parametrize("template", [HUB, SPOKE], ids=["hub", "spoke"])
def test_cfn_lint_reports_nothing(template: Path) -> None:
    # Exit status 0: no error, no warning and no informational finding either.
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    done = subprocess.run(
        [str(cfn_lint), "--include-checks", "I", "--", str(template)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------- shutdown window


def test_the_drain_ends_before_ecs_kills_the_task(hub: dict[str, Any]) -> None:
    stop_timeout = container(hub)["StopTimeout"]
    assert stop_timeout <= FARGATE_MAX_STOP_TIMEOUT
    drain = environment(hub)["HUBGATE_DRAIN_SECONDS"]
    assert upper_bound(hub, drain) < stop_timeout
    assert default(hub, drain) == Settings().drain_seconds


def test_deregistration_waits_at_least_the_drain_window(hub: dict[str, Any]) -> None:
    (group,) = resources(hub, "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    attributes = {a["Key"]: a["Value"] for a in group["TargetGroupAttributes"]}
    delay = float(attributes["deregistration_delay.timeout_seconds"])
    assert 0 <= delay <= 3600
    assert delay >= upper_bound(hub, environment(hub)["HUBGATE_DRAIN_SECONDS"])


def test_the_load_balancer_never_cuts_a_socket_between_two_pings(hub: dict[str, Any]) -> None:
    balancer = only(hub, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    attributes = {a["Key"]: a["Value"] for a in balancer["LoadBalancerAttributes"]}
    idle = attributes["idle_timeout.timeout_seconds"]
    low, high = ALB_IDLE_TIMEOUT_RANGE
    assert low <= lower_bound(hub, idle) <= default(hub, idle) <= upper_bound(hub, idle) <= high
    ping = float(environment(hub)["HUBGATE_PING_INTERVAL_SECONDS"])
    assert 0 < ping < lower_bound(hub, idle)


# ---------------------------------------------------------------------------- settings


def test_the_task_sets_only_variables_hubgate_reads(hub: dict[str, Any]) -> None:
    definition = container(hub)
    names = [entry["Name"] for entry in items(definition["Environment"])]
    names += [entry["Name"] for entry in items(definition["Secrets"])]
    hubgate_names = {name for name in names if name.startswith("HUBGATE_")}
    assert hubgate_names == set(names), "only HUBGATE_* variables are set"
    assert len(names) == len(set(names)), "a variable is set twice"
    assert hubgate_names <= Settings.env_names(), sorted(hubgate_names - Settings.env_names())
    assert {"HUBGATE_HOST", "HUBGATE_PORT", "HUBGATE_REDIS_URL", "HUBGATE_JWT_JWKS_URL"} <= hubgate_names


def test_the_task_environment_is_accepted_by_settings(hub: dict[str, Any]) -> None:
    resolved = {}
    for name, value in environment(hub).items():
        if isinstance(value, str):
            resolved[name] = value
        elif isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in hub["Parameters"]:
            spec = hub["Parameters"][value["Ref"]]
            if "Default" in spec:
                resolved[name] = str(spec["Default"])
    settings = Settings.from_env(resolved)
    assert settings.host == "0.0.0.0"
    assert settings.tenant_claim == "custom:tenant_id"


def test_secrets_come_from_secrets_manager_the_execution_role_may_read(hub: dict[str, Any]) -> None:
    (role,) = (
        props
        for props in resources(hub, "AWS::IAM::Role").values()
        if any(
            "secretsmanager:GetSecretValue" in actions_of(s)
            for s in statements(props["Policies"][0]["PolicyDocument"])
        )
    )
    readable = []
    for statement in statements(role["Policies"][0]["PolicyDocument"]):
        if "secretsmanager:GetSecretValue" in actions_of(statement):
            readable += items(statement["Resource"])
    for secret in items(container(hub)["Secrets"]):
        assert secret["ValueFrom"] in readable, secret


# ---------------------------------------------------------------------------- IAM


def statements(document: Any) -> list[dict[str, Any]]:
    return items(document["Statement"])


def actions_of(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def policy_documents(node: Any) -> Iterator[dict[str, Any]]:
    """Every IAM policy document anywhere in a template."""
    if isinstance(node, dict):
        if "Statement" in node and "Version" in node:
            yield node
        for value in node.values():
            yield from policy_documents(value)
    elif isinstance(node, list):
        for value in node:
            yield from policy_documents(value)


@pytest.mark.parametrize("path", [HUB, SPOKE], ids=["hub", "spoke"])
def test_no_iam_statement_grants_a_wildcard_action(path: Path) -> None:
    documents = list(policy_documents(load(path)["Resources"]))
    assert documents
    for document in documents:
        for statement in statements(document):
            assert "NotAction" not in statement
            for action in actions_of(statement):
                assert "*" not in action, statement


def test_the_task_role_invokes_only_the_listed_models(hub: dict[str, Any]) -> None:
    role = hub["Resources"]["TaskRole"]["Properties"]
    by_sid = {s["Sid"]: s for s in statements(role["Policies"][0]["PolicyDocument"])}
    bedrock = by_sid["BedrockInvoke"]
    assert sorted(actions_of(bedrock)) == ["bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"]
    assert bedrock["Resource"] == {"Ref": "BedrockModelArns"}
    assert actions_of(by_sid["ApplyGuardrails"]) == ["bedrock:ApplyGuardrail"]
    assert by_sid["ApplyGuardrails"]["Resource"] == {"Ref": "GuardrailArns"}
    spokes = by_sid["AssumeSpokeRoles"]
    assert sorted(actions_of(spokes)) == ["sts:AssumeRole", "sts:TagSession"]
    assert spokes["Resource"] == {"Ref": "SpokeRoleArns"} and "Condition" not in spokes
    table = {"Fn::GetAtt": ["TenantsTable", "Arn"]}
    assert sorted(actions_of(by_sid["TenantsRead"])) == [
        "dynamodb:GetItem",
        "dynamodb:Query",
        "dynamodb:Scan",
    ]
    assert sorted(actions_of(by_sid["TenantsAdminWrite"])) == ["dynamodb:PutItem", "dynamodb:UpdateItem"]
    assert by_sid["TenantsRead"]["Resource"] == by_sid["TenantsAdminWrite"]["Resource"] == table


def test_the_spoke_role_needs_the_external_id_and_the_hub_task_role(spoke: dict[str, Any]) -> None:
    trust = statements(spoke["Resources"]["SpokeRole"]["Properties"]["AssumeRolePolicyDocument"])
    by_action = {action: s for s in trust for action in actions_of(s)}
    assume = by_action["sts:AssumeRole"]
    assert assume["Condition"]["StringEquals"]["sts:ExternalId"] == {"Ref": "ExternalId"}
    assert parameter(spoke, {"Ref": "ExternalId"})["NoEcho"] is True
    for statement in (assume, by_action["sts:TagSession"]):
        assert statement["Condition"]["ArnEquals"]["aws:PrincipalArn"] == {"Ref": "HubTaskRoleArn"}
    policy = statements(spoke["Resources"]["SpokeRole"]["Properties"]["Policies"][0]["PolicyDocument"])
    granted = {action for s in policy for action in actions_of(s)}
    assert granted == {
        "bedrock:InvokeModel",
        "bedrock:InvokeModelWithResponseStream",
        "bedrock:ApplyGuardrail",
    }
    assert spoke["Resources"]["Guardrail"]["Condition"] == "WithGuardrail"


# ---------------------------------------------------------------------------- Cognito


def test_users_cannot_choose_their_tenant(hub: dict[str, Any]) -> None:
    pool = only(hub, "AWS::Cognito::UserPool")
    (attribute,) = (a for a in pool["Schema"] if a["Name"] == "tenant_id")
    assert attribute["Mutable"] is False
    assert pool["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is True
    claim = "custom:" + attribute["Name"]
    assert environment(hub)["HUBGATE_TENANT_CLAIM"] == claim

    client = only(hub, "AWS::Cognito::UserPoolClient")
    assert claim not in client["WriteAttributes"]
    assert claim in client["ReadAttributes"]
    groups = resources(hub, "AWS::Cognito::UserPoolGroup")
    assert [g["GroupName"] for g in groups.values()] == ["hubgate-admin"]
    assert environment(hub)["HUBGATE_ADMIN_GROUP"] == {"Ref": next(iter(groups))}


# ---------------------------------------------------------------------------- data stores


def test_redis_is_encrypted_and_its_token_never_leaves_secrets_manager(hub: dict[str, Any]) -> None:
    redis = only(hub, "AWS::ElastiCache::ReplicationGroup")
    assert redis["TransitEncryptionEnabled"] is True
    assert redis["AtRestEncryptionEnabled"] is True
    assert redis["AuthToken"]["Fn::Sub"].startswith("{{resolve:secretsmanager:")
    assert redis["AutomaticFailoverEnabled"] == {"Fn::If": ["RedisIsMultiAZ", True, False]}
    assert redis["MultiAZEnabled"] == {"Fn::If": ["RedisIsMultiAZ", True, False]}
    url = hub["Resources"]["RedisUrlSecret"]["Properties"]["SecretString"]["Fn::Sub"]
    assert url.startswith("rediss://"), "TLS to Redis"


def test_the_tenants_table(hub: dict[str, Any]) -> None:
    table = only(hub, "AWS::DynamoDB::Table")
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert table["SSESpecification"]["SSEEnabled"] is True


# ---------------------------------------------------------------------------- network and service


def test_the_load_balancer_speaks_tls_and_checks_readiness(hub: dict[str, Any]) -> None:
    listeners = {
        props["Protocol"]: props for props in resources(hub, "AWS::ElasticLoadBalancingV2::Listener").values()
    }
    assert listeners["HTTPS"]["SslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    redirect = listeners["HTTP"]["DefaultActions"][0]
    assert redirect["Type"] == "redirect" and redirect["RedirectConfig"]["Protocol"] == "HTTPS"

    (rule,) = resources(hub, "AWS::ElasticLoadBalancingV2::ListenerRule").values()
    assert rule["Conditions"][0]["PathPatternConfig"]["Values"][0] == "/metrics"
    assert rule["Actions"][0]["Type"] == "fixed-response", "/metrics stays inside the VPC"

    group = only(hub, "AWS::ElasticLoadBalancingV2::TargetGroup")
    assert group["TargetType"] == "ip"
    assert group["HealthCheckPath"] == "/readyz"
    assert group["ProtocolVersion"] == "HTTP1"
    assert group["Port"] == environment(hub)["HUBGATE_PORT"]


def test_each_hop_is_open_only_on_its_port(hub: dict[str, Any]) -> None:
    rules = resources(hub, "AWS::EC2::SecurityGroupIngress")
    port = {"Ref": "ContainerPort"}
    into_tasks = [r for r in rules.values() if r["GroupId"] == {"Ref": "TaskSecurityGroup"}]
    assert into_tasks == [
        {
            "Description": into_tasks[0]["Description"],
            "GroupId": {"Ref": "TaskSecurityGroup"},
            "IpProtocol": "tcp",
            "FromPort": port,
            "ToPort": port,
            "SourceSecurityGroupId": {"Ref": "AlbSecurityGroup"},
        }
    ]
    into_redis = [r for r in rules.values() if r["GroupId"] == {"Ref": "RedisSecurityGroup"}]
    assert [(r["FromPort"], r["ToPort"], r["SourceSecurityGroupId"]) for r in into_redis] == [
        (6379, 6379, {"Ref": "TaskSecurityGroup"})
    ]
    groups = hub["Resources"]
    assert "SecurityGroupIngress" not in groups["TaskSecurityGroup"]["Properties"]
    assert "SecurityGroupIngress" not in groups["RedisSecurityGroup"]["Properties"]
    task_egress = groups["TaskSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    assert [(e["FromPort"], e["ToPort"]) for e in task_egress] == [(443, 443)]


def test_deployments_keep_capacity_and_roll_back(hub: dict[str, Any]) -> None:
    service = only(hub, "AWS::ECS::Service")
    deployment = service["DeploymentConfiguration"]
    assert deployment["MinimumHealthyPercent"] == 100 and deployment["MaximumPercent"] == 200
    assert deployment["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    assert service["HealthCheckGracePeriodSeconds"] > 0
    policies = resources(hub, "AWS::ApplicationAutoScaling::ScalingPolicy").values()
    metrics = {
        p["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]["PredefinedMetricType"]
        for p in policies
    }
    assert metrics == {"ECSServiceAverageCPUUtilization", "ALBRequestCountPerTarget"}


def test_the_outputs_a_client_and_a_spoke_need(hub: dict[str, Any], spoke: dict[str, Any]) -> None:
    outputs = hub["Outputs"]
    for name in ("WebSocketUrl", "UserPoolId", "UserPoolClientId", "JwksUrl", "Issuer", "TenantsTableName"):
        assert name in outputs, name
    for branch in outputs["WebSocketUrl"]["Value"]["Fn::If"][1:]:
        assert branch["Fn::Sub"].startswith("wss://") and branch["Fn::Sub"].endswith("/v1/stream")
    env = environment(hub)
    assert outputs["Issuer"]["Value"] == env["HUBGATE_JWT_ISSUER"]
    assert outputs["JwksUrl"]["Value"] == env["HUBGATE_JWT_JWKS_URL"]
    assert env["HUBGATE_JWT_JWKS_URL"]["Fn::Sub"].startswith("https://cognito-idp.")
    assert {"RoleArn", "GuardrailId", "GuardrailVersion"} <= set(spoke["Outputs"])


def test_tenants_table_key_is_the_one_the_registry_uses(hub: dict[str, Any]) -> None:
    from hubgate.registry.dynamodb import KEY

    table = hub["Resources"]["TenantsTable"]["Properties"]
    assert table["KeySchema"] == [{"AttributeName": KEY, "KeyType": "HASH"}]
    assert table["AttributeDefinitions"] == [{"AttributeName": KEY, "AttributeType": "S"}]
