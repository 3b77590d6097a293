#!/usr/bin/env python3
"""Checks of the deployment files that no off-the-shelf validator makes.

Run by scripts/check-deploy (which installs pycep-parser and PyYAML first):

    check_deploy.py COMPOSE_CONFIG_YAML

- deploy/azure/runner-vmss.bicep, parsed with pycep-parser (a Bicep parser; no Bicep compiler
  can be installed from the registries this project reaches): no public IP anywhere, the
  user-assigned identity attached to the scale set, the cloud-init file wired in as custom data
  with every placeholder filled, parameters for the pool, labels and server URL, and the
  parameters file matching the template.
- deploy/cloud-init/outpost-runner.yaml: the systemd unit inside it is the one in deploy/systemd/,
  and its kubectl/helm pins are the runner image's.
- deploy/systemd/outpost-runner.service: the settings that make it drain and keep it hardened.
- docker/*.Dockerfile: multi-stage, non-root numeric user, a HEALTHCHECK; checksummed tools.
- deploy/kubernetes/runner.yaml: non-root, a volume for the credentials, a grace period that
  covers draining, and only variables the runner image reads.
- docker-compose.yml (as `docker-compose config` resolved it): health-gated start order and the
  registration token handed from init to the runner through a shared volume.

Each failed check prints one line saying what is wrong; the exit status is 1 if any failed.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any, Iterator

import yaml
from pycep import BicepParser

ROOT = pathlib.Path(__file__).resolve().parent.parent
failures: list[str] = []


def check(condition: bool, message: str) -> None:
    if not condition:
        failures.append(message)


def walk(node: Any) -> Iterator[Any]:
    """Every dict, list and scalar in a parsed tree, depth first."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def accessor(node: Any) -> str | None:
    """`a.b.c` for a pycep property accessor (or a bare name), else None."""
    if isinstance(node, str):
        return node
    if isinstance(node, dict) and "operator" in node:
        op = node["operator"]
        if op.get("type") == "property_accessor":
            left = accessor(op["operands"]["operand_1"])
            right = accessor(op["operands"]["operand_2"])
            if left is not None and right is not None:
                return f"{left}.{right}"
    return None


def function(node: Any, name: str) -> dict | None:
    """The parameters of a call to the Bicep function `name`, if node is one."""
    if isinstance(node, dict) and "function" in node and node["function"].get("type") == name:
        return node["function"]["parameters"]
    return None


def resource_body(resource: dict) -> dict:
    """A resource's body, looking through `if (...)` conditions."""
    config = resource["config"]
    if "condition" in config and "config" in config:
        return config["config"]
    return config


def check_bicep() -> None:
    template_path = ROOT / "deploy/azure/runner-vmss.bicep"
    tree = BicepParser().parse(file_path=template_path)
    params = tree["parameters"]
    resources = tree["resources"]
    variables = tree["variables"]

    for required in ("pool", "labels", "serverUrl", "subnetId", "mode", "registration"):
        check(required in params, f"bicep: no parameter `{required}`")
    token = params.get("registrationToken", {})
    check(
        any(d.get("type") == "secure" for d in token.get("decorators", [])),
        "bicep: registrationToken must be @secure()",
    )

    # No public IP: no such resource, and no public IP configuration on any NIC.
    for name, resource in resources.items():
        check(
            "publicIPAddresses" not in resource["type"],
            f"bicep: resource {name} is a public IP",
        )
    for node in walk(tree):
        if isinstance(node, dict):
            for key in node:
                check(
                    "publicIPAddressConfiguration" not in key and "publicIpAddressConfiguration" not in key,
                    f"bicep: {key} found: the runners must have no public IP",
                )

    scale_sets = {n: r for n, r in resources.items() if r["type"] == "Microsoft.Compute/virtualMachineScaleSets"}
    identities = {n: r for n, r in resources.items() if r["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities"}
    check(len(scale_sets) == 1, f"bicep: expected one scale set, found {sorted(scale_sets)}")
    check(len(identities) == 1, f"bicep: expected one user-assigned identity, found {sorted(identities)}")
    if len(scale_sets) != 1 or len(identities) != 1:
        return
    (vmss_name, vmss), = scale_sets.items()
    (identity_name, _), = identities.items()
    body = resource_body(vmss)

    # The identity is attached.
    identity = body.get("identity", {})
    check(identity.get("type") == "UserAssigned", "bicep: the scale set's identity type is not UserAssigned")
    attached = [accessor(k.strip("'${}")) or k for k in identity.get("userAssignedIdentities", {})]
    check(
        any(f"{identity_name}.id" in k for k in identity.get("userAssignedIdentities", {})),
        f"bicep: the scale set does not attach {identity_name}.id (found {attached})",
    )

    props = body["properties"]
    check(props.get("overprovision") is False, "bicep: overprovision must be false (extra instances would register)")
    check(props.get("upgradePolicy", {}).get("mode") == "Manual", "bicep: upgradePolicy.mode must be Manual")
    profile = props["virtualMachineProfile"]
    linux = profile["osProfile"].get("linuxConfiguration", {})
    check(linux.get("disablePasswordAuthentication") is True, "bicep: password authentication must be off")

    # The NIC joins the existing subnet given as a parameter.
    subnets = [
        ip["properties"]["subnet"]["id"]
        for nic in profile["networkProfile"]["networkInterfaceConfigurations"]
        for ip in nic["properties"]["ipConfigurations"]
    ]
    check(subnets == ["subnetId"], f"bicep: the NIC's subnet must be the subnetId parameter, found {subnets}")

    # Custom data is base64(cloudInit), and cloudInit is the cloud-init file with every
    # placeholder replaced, one replace() per placeholder.
    custom = profile["osProfile"].get("customData")
    b64 = function(custom, "base64")
    check(b64 is not None, "bicep: customData is not base64(...)")
    if b64 is None:
        return
    value = b64["input_value"] if "input_value" in b64 else next(iter(b64.values()))
    replaced: list[str] = []
    source = None
    seen = set()
    while isinstance(value, str) and value in variables and value not in seen:
        seen.add(value)
        value = variables[value]["value"]
        while True:
            call = function(value, "replace")
            if call is None:
                break
            replaced.append(call["old_string"])
            value = call["original_string"]
    load = function(value, "load_text_content")
    check(load is not None, "bicep: customData does not come from loadTextContent(...)")
    if load is None:
        return
    source = (template_path.parent / load["file_path"]).resolve()
    check(source == ROOT / "deploy/cloud-init/outpost-runner.yaml", f"bicep: custom data is {source}, not the runner's cloud-init")
    text = source.read_text()
    placeholders = set(re.findall(r"@@[A-Z0-9_]+@@", text))
    check(placeholders == set(replaced), f"bicep: placeholders in the cloud-init {sorted(placeholders)} != replaced {sorted(replaced)}")

    # Ephemeral mode's self-reimage right is conditional and scoped to the scale set.
    for name, resource in resources.items():
        if resource["type"] == "Microsoft.Authorization/roleAssignments":
            check("condition" in resource["config"], f"bicep: role assignment {name} must exist only in ephemeral mode")
            check(resource_body(resource).get("scope") == vmss_name, f"bicep: role assignment {name} must be scoped to the scale set")

    # The parameters file gives every parameter without a default, and only known ones.
    given = json.loads((ROOT / "deploy/azure/runner-vmss.parameters.json").read_text())["parameters"]
    for name, param in params.items():
        if param.get("default") is None:
            check(name in given, f"bicep: runner-vmss.parameters.json does not give the required parameter {name}")
    for name in given:
        check(name in params, f"bicep: runner-vmss.parameters.json gives {name}, which the template does not declare")
    for output in ("identityPrincipalId", "identityClientId"):
        check(output in tree.get("outputs", {}), f"bicep: no output {output}")


def dockerfile_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG ([A-Za-z0-9_]+)=(\S+)", text, flags=re.M))


def check_cloud_init() -> None:
    config = yaml.safe_load((ROOT / "deploy/cloud-init/outpost-runner.yaml").read_text())
    files = {f["path"]: f for f in config["write_files"]}
    unit = files.get("/etc/systemd/system/outpost-runner.service")
    check(unit is not None, "cloud-init: does not install the systemd unit")
    if unit is not None:
        check(
            unit["content"] == (ROOT / "deploy/systemd/outpost-runner.service").read_text(),
            "cloud-init: its systemd unit differs from deploy/systemd/outpost-runner.service; copy it over",
        )
    install = files.get("/usr/local/libexec/outpost-runner/install", {}).get("content", "")
    check("/usr/local/libexec/outpost-runner/install" in json.dumps(config["runcmd"]), "cloud-init: runcmd does not run the install script")
    pins = dict(re.findall(r"^(KUBECTL_VERSION|KUBECTL_SHA256|HELM_VERSION|HELM_SHA256)=(\S+)$", install, flags=re.M))
    args = dockerfile_args((ROOT / "docker/runner.Dockerfile").read_text())
    expected = {
        "KUBECTL_VERSION": args.get("KUBECTL_VERSION"),
        "KUBECTL_SHA256": args.get("KUBECTL_SHA256_amd64"),
        "HELM_VERSION": args.get("HELM_VERSION"),
        "HELM_SHA256": args.get("HELM_SHA256_amd64"),
    }
    check(pins == expected, f"cloud-init: kubectl/helm pins {pins} differ from docker/runner.Dockerfile {expected}")
    check("sha256sum -c" in install, "cloud-init: downloads are not checked with sha256sum")
    check("systemctl enable --now outpost-runner" in install, "cloud-init: does not enable and start the service")
    for mode in ("entra)", "token)"):
        check(mode in install, f"cloud-init: no `{mode}` registration branch")


def check_systemd() -> None:
    text = (ROOT / "deploy/systemd/outpost-runner.service").read_text()
    settings: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    for key, value in {
        "Restart": "always",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "KillMode": "mixed",
        "KillSignal": "SIGTERM",
        "User": "outpost-runner",
    }.items():
        check(settings.get(key) == value, f"systemd: {key}={settings.get(key)}, expected {value}")
    check("StateDirectory" in settings or "ReadWritePaths" in settings, "systemd: no writable state directory")
    timeout = settings.get("TimeoutStopSec", "0s")
    seconds = int(re.fullmatch(r"(\d+)s?", timeout).group(1)) if re.fullmatch(r"(\d+)s?", timeout) else 0
    # drain_grace_secs defaults to 3600; stopping must leave that long to drain.
    check(seconds > 3600, f"systemd: TimeoutStopSec={timeout} does not cover the 3600 s drain grace")


def check_dockerfiles() -> None:
    for name in ("server", "runner"):
        text = (ROOT / f"docker/{name}.Dockerfile").read_text()
        froms = re.findall(r"^FROM ", text, flags=re.M)
        check(len(froms) >= 2, f"docker/{name}.Dockerfile: not a multi-stage build")
        users = re.findall(r"^USER (\S+)", text, flags=re.M)
        check(bool(users) and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]) is not None and not users[-1].startswith("0"),
              f"docker/{name}.Dockerfile: the final USER must be a numeric non-root uid, found {users}")
        check(re.search(r"^HEALTHCHECK ", text, flags=re.M) is not None, f"docker/{name}.Dockerfile: no HEALTHCHECK")
    runner = (ROOT / "docker/runner.Dockerfile").read_text()
    for tool in ("kubectl", "helm", "git", "bash"):
        check(tool in runner, f"docker/runner.Dockerfile: does not install {tool}")
    check(runner.count("sha256sum -c") >= 2, "docker/runner.Dockerfile: kubectl and helm are not checked with sha256sum")


def check_compose(config_path: pathlib.Path) -> None:
    config = yaml.safe_load(config_path.read_text())
    services = config["services"]
    for name in ("postgres", "init", "server", "runner"):
        check(name in services, f"compose: no service {name}")
    if not all(n in services for n in ("postgres", "init", "server", "runner")):
        return
    check("healthcheck" in services["postgres"], "compose: postgres has no healthcheck")
    check(any("postgresql/data" in v for v in map(str, services["postgres"].get("volumes", []))), "compose: postgres data is not on a volume")

    def depends(service: str, on: str) -> str | None:
        return services[service].get("depends_on", {}).get(on, {}).get("condition")

    check(depends("init", "postgres") == "service_healthy", "compose: init must wait for a healthy postgres")
    check(depends("server", "init") == "service_completed_successfully", "compose: server must wait for init to succeed")
    check(depends("runner", "server") == "service_healthy", "compose: runner must wait for a healthy server")
    init_command = "\n".join(services["init"].get("command", []))
    check("outpost-server migrate" in init_command, "compose: init does not migrate")
    check("registration-token create" in init_command, "compose: init does not create a registration token")

    # The runner reads the token file init writes, through a volume both mount.
    def mounts(service: str) -> dict[str, str]:
        out = {}
        for volume in services[service].get("volumes", []):
            source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
            out[target] = source
        return out

    token_file = services["runner"]["environment"].get("OUTPOST_REGISTRATION_TOKEN_FILE", "")
    runner_dir = str(pathlib.PurePosixPath(token_file).parent)
    volume = mounts("runner").get(runner_dir)
    check(volume is not None, f"compose: the runner's token file {token_file} is not on a volume")
    init_dirs = [t for t, s in mounts("init").items() if s == volume]
    check(
        any(f"{d}/{pathlib.PurePosixPath(token_file).name}" in init_command for d in init_dirs),
        f"compose: init does not write {pathlib.PurePosixPath(token_file).name} into the volume {volume} the runner reads",
    )
    server_url = services["runner"]["environment"].get("OUTPOST_SERVER", "")
    check(server_url.startswith("http://server:"), f"compose: the runner's OUTPOST_SERVER {server_url} is not the server service")


def check_kubernetes() -> None:
    documents = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/runner.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in documents}
    for kind in ("ServiceAccount", "StatefulSet"):
        check(kind in kinds, f"kubernetes: no {kind}")
    if "StatefulSet" not in kinds:
        return
    pod = kinds["StatefulSet"]["spec"]["template"]["spec"]
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, "kubernetes: the pod must run as non-root")
    check(pod.get("terminationGracePeriodSeconds", 0) > 3600, "kubernetes: terminationGracePeriodSeconds must cover the 3600 s drain grace")
    check(pod.get("serviceAccountName") == kinds.get("ServiceAccount", {}).get("metadata", {}).get("name"),
          "kubernetes: the pod does not use the ServiceAccount")
    mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
    check("/var/lib/outpost-runner" in mounts, "kubernetes: the runner's config dir is not on a volume")
    env = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
    check({"OUTPOST_SERVER", "OUTPOST_RUNNER_LABELS"} <= env, "kubernetes: OUTPOST_SERVER or OUTPOST_RUNNER_LABELS missing")
    entrypoint = (ROOT / "docker/runner-entrypoint.sh").read_text()
    for name in env:
        check(name in entrypoint or name.startswith("OUTPOST_RUNNER__"), f"kubernetes: the runner image does not read {name}")


def main() -> int:
    compose_config = pathlib.Path(sys.argv[1])
    for step in (check_bicep, check_cloud_init, check_systemd, check_dockerfiles, check_kubernetes, lambda: check_compose(compose_config)):
        try:
            step()
        except Exception as e:  # A file too broken to inspect is a failure, with its reason.
            failures.append(f"{getattr(step, '__name__', 'check')}: could not inspect: {e!r}")
    for failure in failures:
        print(f"check_deploy: {failure}", file=sys.stderr)
    if failures:
        print(f"0 passed, {len(failures)} failed", file=sys.stderr)
        return 1
    print("check_deploy: bicep, cloud-init, systemd, Dockerfiles, Kubernetes and compose hold their key properties")
    return 0


if __name__ == "__main__":
    sys.exit(main())
