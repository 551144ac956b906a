"""Checks of deploy/ and docs/deploy.md: they parse, agree with each other, and name only files,
flows, images and command lines that exist.

Docker is not run here: images are not built. What can be checked without an engine is: the
YAML and JSON parse; prefect.yaml passes Prefect's own loader and (test marked slow) deploys on a
real `prefect server start`; every `medpipe`, `prefect` and `dask` command line in these files
names a real subcommand and real options (checked against each program's --help); Dockerfiles
copy files that exist; compose and Kubernetes describe the same stack.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from deploy_checks import (
    BIN,
    DASK_CUDA_WORKER_FLAGS,
    DEPLOY,
    DOCS,
    MEDPIPE_CLI,
    ROOT,
    as_argv,
    cli_help,
    has_flag,
    lists_command,
    load_yaml,
    load_yaml_all,
    medpipe_cli_runs,
    program_commands,
    text_commands,
)

SCHEDULER = "tcp://scheduler:8786"
API_URL = "http://prefect-server:4200/api"
DEPLOYMENT_POOLS = {"nightly": "medpipe-process", "nightly-pacs": "medpipe-process", "nightly-docker": "medpipe-docker",
                    "nightly-k8s": "medpipe-k8s"}
EDITABLE_PARAMETERS = {"out", "config_file", "force"}
FLOW_PARAMETERS = {"archive", "out", "config", "config_file", "force", "dask_address", "source", "send", "since",
                   "until"}


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        key, _, version = line.partition("==")
        if key.strip().lower().replace("_", "-") == name:
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {name}")


# --------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    docs = load_yaml_all(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_json_parses():
    for path in DEPLOY.rglob("*.json"):
        assert isinstance(json.loads(path.read_text()), dict), path


# --------------------------------------------------------------------------------------------
# prefect.yaml


def test_prefect_yaml_passes_prefects_loader(prefect_yaml):
    """The model and loader of `prefect deploy` (prefect 3.8) accept the file as it is."""
    from rich.console import Console

    from prefect.cli.deploy._config import _load_deploy_configs_and_actions, _pick_deploy_configs
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_yaml)  # raises on a wrong type or shape
    # The model ignores unknown keys: a misspelt key would be dropped without a word.
    top_keys = set(PrefectYamlModel.model_fields) | {"prefect-version", "definitions"}
    assert set(prefect_yaml) <= top_keys, set(prefect_yaml) - top_keys
    for raw in prefect_yaml["deployments"]:
        assert set(raw) <= set(DeploymentConfig.model_fields), set(raw) - set(DeploymentConfig.model_fields)
        assert set(raw["work_pool"]) <= {"name", "work_queue_name", "job_variables"}
    assert [d.name for d in model.deployments] == list(DEPLOYMENT_POOLS)

    out = io.StringIO()
    console = Console(file=out, width=200)
    configs, actions = _load_deploy_configs_and_actions(DEPLOY / "prefect.yaml", console=console)
    assert "Skipping" not in out.getvalue(), out.getvalue()
    assert actions["build"] == [] and actions["push"] == []
    picked = _pick_deploy_configs(configs, ["nightly"], False, console=console, is_interactive=lambda: False)
    assert [c["name"] for c in picked] == ["nightly"]
    picked = _pick_deploy_configs(configs, [], True, console=console, is_interactive=lambda: False)
    assert len(picked) == len(DEPLOYMENT_POOLS)


def test_prefect_yaml_deployments(prefect_yaml):
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.schedules import CronSchedule

    for dep in prefect_yaml["deployments"]:
        name = dep["name"]
        assert dep["entrypoint"] == "flows/archive.py:process_archive", name
        assert dep["work_pool"]["name"] == DEPLOYMENT_POOLS[name]
        assert EDITABLE_PARAMETERS | {"dask_address"} <= set(dep["parameters"]), name
        assert set(dep["parameters"]) <= FLOW_PARAMETERS, name
        assert dep["parameters"]["force"] is False
        [schedule] = dep["schedules"]
        built = _schedule_config_to_deployment_schedule(schedule)["schedule"]  # validates cron and zone
        assert isinstance(built, CronSchedule)
        assert built.cron == "0 2 * * *" and built.timezone
        if name not in ("nightly", "nightly-pacs"):  # process pools: no pull, no compose address
            # Containers: the code is in the image at /opt/medpipe, the Dask cluster is compose's.
            assert dep["pull"] == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/medpipe"}}
            ]
            assert dep["parameters"]["dask_address"] == SCHEDULER
            assert dep["work_pool"]["job_variables"]["image"] == "medpipe:cpu"
        else:
            assert "pull" not in dep  # prefect deploy records its working directory


def test_prefect_yaml_docker_pool_matches_compose(prefect_yaml, compose):
    [dep] = [d for d in prefect_yaml["deployments"] if d["name"] == "nightly-docker"]
    job = dep["work_pool"]["job_variables"]
    assert job["networks"] == [compose["networks"]["default"]["name"]]
    named = {v["name"] for v in compose["volumes"].values()}
    for volume in job["volumes"]:
        source, target = volume.split(":")[:2]
        assert source in named and target in {"/data/archive", "/data/out"}


def _flow_function() -> ast.FunctionDef | None:
    path = ROOT / "flows" / "archive.py"
    if not path.exists():
        return None
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "process_archive":
            return node
    raise AssertionError("flows/archive.py defines no process_archive")


def test_entrypoint_resolves_to_the_flow(prefect_yaml):
    """entrypoint path:function names a flow whose parameters cover the deployments'."""
    func = _flow_function()
    if func is None:
        pytest.skip("flows/archive.py is not written yet")
    decorators = [d.func if isinstance(d, ast.Call) else d for d in func.decorator_list]
    assert any(getattr(d, "id", getattr(d, "attr", None)) == "flow" for d in decorators), "not a @flow"
    for d in func.decorator_list:
        if isinstance(d, ast.Call):
            names = [k.value.value for k in d.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)]
            assert names in ([], ["medpipe-archive"])
    args = func.args
    params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    n_required = len(args.posonlyargs + args.args) - len(args.defaults)
    required = set(params[:n_required]) | {
        a.arg for a, default in zip(args.kwonlyargs, args.kw_defaults) if default is None
    }
    for dep in prefect_yaml["deployments"]:
        assert set(dep["parameters"]) <= set(params), set(dep["parameters"]) - set(params)
        assert required <= set(dep["parameters"]), required - set(dep["parameters"])


# --------------------------------------------------------------------------------------------
# Command lines


def _compose_argv(service: dict, image_entrypoint: list[str]) -> list[str]:
    entrypoint = as_argv(service["entrypoint"]) if "entrypoint" in service else image_entrypoint
    return entrypoint + as_argv(service.get("command"))


def _image_entrypoint(dockerfile: Path) -> list[str]:
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), re.MULTILINE)
    assert m, f"{dockerfile} has no exec-form ENTRYPOINT"
    return json.loads(m.group(1))


def _all_commands() -> list[tuple[str, list[str]]]:
    """Every medpipe/prefect/dask command line in deploy/ and docs/deploy.md, with its origin."""
    found: list[tuple[str, list[str]]] = []
    compose = load_yaml(DEPLOY / "compose.yaml")
    for name, service in compose["services"].items():
        if "build" not in service:
            continue  # an image of its own (postgres): none of our programs
        image_entrypoint = _image_entrypoint(ROOT / service["build"]["dockerfile"])
        for cmd in program_commands(_compose_argv(service, image_entrypoint)):
            found.append((f"compose:{name}", cmd))
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_yaml_all(path):
            for container in _containers(doc):
                argv = as_argv(container.get("command")) + as_argv(container.get("args"))
                for cmd in program_commands(argv):
                    found.append((f"{path.name}:{container['name']}", cmd))
    texts = [DOCS, *sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix != ".json")]
    for path in texts:
        for cmd in text_commands(path.read_text()):
            found.append((str(path.relative_to(ROOT)), cmd))
    return found


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


COMMANDS = _all_commands()


def test_commands_were_found():
    programs = {cmd[0] for _, cmd in COMMANDS}
    assert programs == {"medpipe", "prefect", "dask"}
    assert len(COMMANDS) > 20


def _resolve(cmd: list[str]) -> tuple[list[str], str]:
    """The subcommand path of a command line, and the help text of that path."""
    program, words = cmd[0], cmd[1:]
    path: list[str] = []
    for word in words:
        if word.startswith("-"):
            break
        code, text = cli_help(program, *path)
        assert code == 0, f"`{program} {' '.join(path)} --help` failed:\n{text}"
        if not lists_command(text, word):
            break
        path.append(word)
    code, text = cli_help(program, *path)
    assert code == 0, f"`{program} {' '.join(path)} --help` failed:\n{text}"
    return path, text


def _flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


@pytest.mark.parametrize("origin,cmd", COMMANDS, ids=[f"{o}:{' '.join(c[:4])}" for o, c in COMMANDS])
def test_command_exists(origin, cmd):
    program, words = cmd[0], cmd[1:]
    if program == "dask" and words[:2] == ["cuda", "worker"]:
        import importlib.util

        if importlib.util.find_spec("dask_cuda") is None:
            unknown = set(_flags(words)) - DASK_CUDA_WORKER_FLAGS
            assert not unknown, f"{origin}: `dask cuda worker` has no {unknown}"
            return
    if program == "medpipe" and not medpipe_cli_runs():
        assert words and words[0] in MEDPIPE_CLI, f"{origin}: no medpipe subcommand in {cmd}"
        unknown = set(_flags(words)) - MEDPIPE_CLI[words[0]]
        assert not unknown, f"{origin}: `medpipe {words[0]}` has no {unknown}"
        return
    path, text = _resolve(cmd)
    assert path, f"{origin}: `{' '.join(cmd)}` names no subcommand of {program}"
    for flag in _flags(words):
        assert has_flag(text, flag), f"{origin}: `{program} {' '.join(path)}` has no option {flag}"


def test_medpipe_subcommands_of_the_brief_exist():
    """Once the CLI runs, every subcommand the deploy files rely on is in its help."""
    if not medpipe_cli_runs():
        pytest.skip("medpipe --help does not run yet (flows/cli.py)")
    _, text = cli_help("medpipe")
    for sub in ("run", "serve", "plan"):
        assert lists_command(text, sub), sub


# --------------------------------------------------------------------------------------------
# Dockerfiles


def _dockerfile(name: str) -> str:
    return (DEPLOY / "docker" / name).read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        line = buf + line
        buf = ""
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_copies_files_that_exist(name):
    ignore = (DEPLOY / "docker" / f"{name}.dockerignore").read_text().splitlines()
    included = [p[1:] for p in ignore if p.startswith("!")]
    copies = [rest for instr, rest in _instructions(_dockerfile(name)) if instr in {"COPY", "ADD"}]
    assert copies
    for rest in copies:
        words = [w for w in rest.split() if not w.startswith("--")]
        for source in words[:-1]:
            if any(ch in source for ch in "*?["):
                continue  # a glob may match nothing (README.md*)
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file in the repository"
            assert any(source == inc or source.startswith(inc + "/") for inc in included), (
                f"{name}: {source} is excluded by {name}.dockerignore"
            )


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_installs_the_project(name):
    text = _dockerfile(name)
    instructions = _instructions(text)
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    assert re.search(r"pip install -c \S*constraints\S*\.txt", runs), "install with the pinned constraints"
    users = [rest for instr, rest in instructions if instr == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the image must end as a non-root user"
    assert _image_entrypoint(DEPLOY / "docker" / name) == ["medpipe"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "medpipe" in pyproject["project"]["scripts"]
    # The entrypoint of prefect.yaml is relative to the image's working directory.
    workdirs = [rest for instr, rest in instructions if instr == "WORKDIR"]
    assert workdirs[-1] == "/opt/medpipe"
    assert "COPY deploy/prefect.yaml ./deploy/prefect.yaml" in text


def test_dockerfile_cpu_base():
    froms = [rest for instr, rest in _instructions(_dockerfile("Dockerfile.cpu")) if instr == "FROM"]
    assert froms == ["python:3.11-slim"]


def test_dockerfile_cuda_pins_agree_with_constraints():
    text = _dockerfile("Dockerfile.cuda")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert "python3.11" in text and '".[gpu]"' in text
    # tensorflow with CUDA at the version tensorflow-cpu is pinned to, replacing it.
    assert args["TF_VERSION"] == _constraint("tensorflow-cpu")
    assert '"tensorflow[and-cuda]==${TF_VERSION}"' in text
    assert "pip uninstall -y tensorflow-cpu" in text
    # GPU pins sit on top of the CPU set, whose dask is the one dask-cuda requires.
    gpu = (ROOT / "constraints-gpu.txt").read_text()
    assert "-c constraints.txt" in gpu and "-c constraints-gpu.txt" in text
    assert re.search(r"^dask-cuda==26\.10\.", gpu, re.MULTILINE) and _constraint("dask") == "2026.7.1"
    assert _constraint("distributed") == _constraint("dask")


# --------------------------------------------------------------------------------------------
# compose


def test_compose_services(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "scheduler", "gpu-worker-0", "prefect-worker", "deploy"} <= set(services)

    pg = services["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(as_argv(pg["healthcheck"]["test"]))

    server = services["prefect-server"]
    assert as_argv(server["entrypoint"]) == ["prefect", "server", "start"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "127.0.0.1:4200:4200" in server["ports"]

    assert as_argv(services["scheduler"]["entrypoint"]) == ["dask", "scheduler"]
    assert "8786" in as_argv(services["scheduler"]["command"])

    worker = services["prefect-worker"]
    argv = _compose_argv(worker, [])
    assert argv[:3] == ["prefect", "worker", "start"]
    assert argv[argv.index("--pool") + 1] == "medpipe-process"
    assert worker["environment"]["PREFECT_API_URL"] == API_URL
    assert worker["environment"]["DASK_SCHEDULER_ADDRESS"] == SCHEDULER

    script = " ".join(as_argv(services["deploy"]["command"]))
    assert "--name nightly" in script and f"dask_address={SCHEDULER}" in script
    assert "prefect work-pool create medpipe-process --type process" in script


def _gpu_workers(compose) -> dict[str, dict]:
    return {k: v for k, v in compose["services"].items() if k.startswith("gpu-worker")}


def test_compose_gpu_workers_one_gpu_each(compose):
    workers = _gpu_workers(compose)
    assert len(workers) >= 2
    ids = []
    for name, service in workers.items():
        argv = _compose_argv(service, [])
        assert argv[:4] == ["dask", "cuda", "worker", SCHEDULER], name
        assert "--rmm-pool-size" in argv, name
        assert argv[argv.index("--resources") + 1] == "GPU=1", name
        assert argv[argv.index("--nthreads") + 1] == "1", name
        assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda"
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert len(device["device_ids"]) == 1, f"{name}: one GPU per worker"
        ids += device["device_ids"]
        assert service["environment"]["PREFECT_API_URL"] == API_URL
    assert len(set(ids)) == len(ids), "two workers reserve the same GPU"


def test_compose_shared_volumes(compose):
    """Whatever reads studies or writes outputs sees the archive and the outputs at one path."""
    for name, service in compose["services"].items():
        argv = _compose_argv(service, ["medpipe"])
        if argv[:2] in (["dask", "cuda"], ["dask", "worker"]) or name in {"prefect-worker", "medpipe"}:
            targets = dict(re.match(r".*:(/[^:]+)(:ro)?$", v).groups() for v in service["volumes"])
            assert targets.get("/data/archive") == ":ro", f"{name}: archive mounted read-only"
            assert "/data/out" in targets, name
    for volume in ("medpipe-archive", "medpipe-out", "postgres-data"):
        assert volume in compose["volumes"]


def test_compose_services_reach_each_other(compose):
    """Service names and ports in URLs are those of services of the file."""
    services = compose["services"]
    text = (DEPLOY / "compose.yaml").read_text()
    for host, port in re.findall(r"(?:tcp|http)://([a-z][\w-]*):(\d+)", text):
        if host == "localhost":
            continue
        assert host in services, host
        argv = " ".join(_compose_argv(services[host], []))
        assert port in argv, f"{host} does not listen on {port}"


AUTH_VAR = "${PREFECT_AUTH_STRING:?"


def test_compose_auth_is_always_on(compose):
    """The server requires basic auth, and every Prefect client of the stack sends it (no opt-in file)."""
    assert not (DEPLOY / "compose.auth.yaml").exists()
    services = compose["services"]
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith(AUTH_VAR)
    clients = {
        name for name, s in services.items()
        if isinstance(s.get("environment"), dict) and "PREFECT_API_URL" in s["environment"]
    }
    assert {"prefect-worker", "deploy", "medpipe", "gpu-worker-0", "cpu-worker"} <= clients
    for name in clients:
        env = services[name]["environment"]
        assert env["PREFECT_API_AUTH_STRING"].startswith(AUTH_VAR), name
        # Runs write only under the mounted output folder, whatever their `out` parameter says.
        assert env["MEDPIPE_ALLOWED_OUT_ROOTS"] == "/data/out", name


def test_compose_publishes_nothing_beyond_loopback(compose):
    """No port on the host's other interfaces; the Dask scheduler (no authentication) on none at all."""
    published = {}
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            port = str(port)
            host_ip, host_port, _container = port.split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond the loopback interface"
            published[host_port] = name
    assert published == {"4200": "prefect-server", "8787": "scheduler"}


# --------------------------------------------------------------------------------------------
# Kubernetes


def _by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_kustomization_lists_every_manifest():
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for doc in load_yaml_all(DEPLOY / "k8s" / "namespace.yaml"):
        assert doc["metadata"]["name"] == kustomization["namespace"]


def test_k8s_manifests_are_well_formed(k8s_docs):
    for doc in k8s_docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        assert doc["metadata"].get("name"), doc
    deployments = _by_kind(k8s_docs, "Deployment")
    pod_labels = []
    for name, dep in deployments.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        pod_labels.append(labels)
    for name, svc in _by_kind(k8s_docs, "Service").items():
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), f"service {name} selects no pod"


def test_k8s_same_stack_as_compose(k8s_docs, compose):
    deployments = _by_kind(k8s_docs, "Deployment")
    assert {"postgres", "prefect-server", "scheduler", "gpu-worker", "prefect-worker"} <= set(deployments)
    services = _by_kind(k8s_docs, "Service")
    assert {"postgres", "prefect-server", "scheduler"} <= set(services)
    # Images: those compose builds or pulls, nothing else.
    compose_images = {s["image"] for s in compose["services"].values()}
    for doc in k8s_docs:
        for container in _containers(doc):
            assert container["image"] in compose_images, container["image"]

    def argv(deployment):
        [c] = _containers(deployments[deployment])
        return as_argv(c.get("command")) + as_argv(c.get("args"))

    for name in ("prefect-server", "scheduler", "prefect-worker"):
        assert argv(name) == _compose_argv(compose["services"][name], []), name
    gpu = _containers(deployments["gpu-worker"])[0]
    assert gpu["image"] == "medpipe:cuda"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    compose_gpu = _compose_argv(compose["services"]["gpu-worker-0"], [])
    k8s_gpu = argv("gpu-worker")
    assert k8s_gpu[:4] == compose_gpu[:4] == ["dask", "cuda", "worker", SCHEDULER]
    assert _flags(k8s_gpu) == _flags(compose_gpu)
    assert k8s_gpu[k8s_gpu.index("--resources") + 1] == "GPU=1"
    # Service ports are the ones the programs listen on.
    assert {p["port"] for p in services["scheduler"]["spec"]["ports"]} == {8786, 8787}
    assert {p["port"] for p in services["prefect-server"]["spec"]["ports"]} == {4200}


def test_k8s_references_resolve(k8s_docs):
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    claims = set(_by_kind(k8s_docs, "PersistentVolumeClaim"))
    configmaps = set(_by_kind(k8s_docs, "ConfigMap"))
    secrets = {s["name"] for s in kustomization.get("secretGenerator", [])}
    for doc in k8s_docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        mounted = {v["name"] for v in pod.get("volumes", [])}
        for container in _containers(doc):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in mounted
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
                else:
                    assert source["configMapRef"]["name"] in configmaps
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets
    env = _by_kind(k8s_docs, "ConfigMap")["medpipe-env"]["data"]
    assert env["PREFECT_API_URL"] == API_URL and env["DASK_SCHEDULER_ADDRESS"] == SCHEDULER
    for name in ("gpu-worker", "prefect-worker"):
        [c] = _containers(_by_kind(k8s_docs, "Deployment")[name])
        assert {"configMapRef": {"name": "medpipe-env"}} in c["envFrom"], name
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data/archive", "/data/out"}, name


def test_k8s_auth_is_always_on(k8s_docs):
    """The server takes its auth string from the Secret prefect-auth; every Prefect client gets it too."""
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    [generated] = [s for s in kustomization["secretGenerator"] if s["name"] == "prefect-auth"]
    assert any(lit.startswith("PREFECT_API_AUTH_STRING=") for lit in generated["literals"])
    deployments = _by_kind(k8s_docs, "Deployment")
    [server] = _containers(deployments["prefect-server"])
    env = {e["name"]: e for e in server["env"]}
    ref = env["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "prefect-auth", "key": "PREFECT_API_AUTH_STRING"}
    clients = [("Deployment", "gpu-worker"), ("Deployment", "prefect-worker"), ("Job", "deploy-nightly")]
    for kind, name in clients:
        [c] = _containers(_by_kind(k8s_docs, kind)[name])
        assert {"secretRef": {"name": "prefect-auth"}} in c["envFrom"], name
    env = _by_kind(k8s_docs, "ConfigMap")["medpipe-env"]["data"]
    assert env["MEDPIPE_ALLOWED_OUT_ROOTS"] == "/data/out"


def test_k8s_internal_only(k8s_docs):
    """Services stay inside the cluster, no pod takes a host port, and a policy admits only the namespace."""
    for name, svc in _by_kind(k8s_docs, "Service").items():
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", name
    assert not _by_kind(k8s_docs, "Ingress")
    for doc in k8s_docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        assert not pod.get("hostNetwork"), doc["metadata"]["name"]
        for container in _containers(doc):
            assert all("hostPort" not in p for p in container.get("ports", [])), doc["metadata"]["name"]
    [policy] = _by_kind(k8s_docs, "NetworkPolicy").values()
    [selector] = policy["spec"]["podSelector"]["matchExpressions"]
    assert {"prefect-server", "scheduler", "postgres"} <= set(selector["values"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]


def test_k8s_work_pool_template(k8s_docs):
    """The kubernetes pool's job template uses only its own variables and mounts existing PVCs."""
    template = json.loads((DEPLOY / "k8s" / "work-pool-medpipe-k8s.json").read_text())
    variables = set(template["variables"]["properties"])
    placeholders = set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= variables, placeholders - variables
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims == {"medpipe-archive", "medpipe-out"} <= set(_by_kind(k8s_docs, "PersistentVolumeClaim"))
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    assert template["variables"]["properties"]["namespace"]["default"] == kustomization["namespace"]


# --------------------------------------------------------------------------------------------
# docs and paths


# Files the docs tell the operator to create (secrets: never in the repository).
MADE_BY_THE_OPERATOR = {"deploy/.env"}


def test_paths_named_in_deploy_files_and_docs_exist():
    pattern = re.compile(r"(?<![\w/.-])((?:deploy|docs|flows|tasks|medpipe)/[\w./-]*\w)")
    for path in [DOCS, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]:
        for ref in pattern.findall(path.read_text()):
            if ref.startswith("deploy/k8s/") or ref.startswith("deploy/") or "." in ref.rsplit("/", 1)[-1]:
                target = ref.split(":", 1)[0]
                if target in MADE_BY_THE_OPERATOR:
                    continue
                assert (ROOT / target).exists(), f"{path.relative_to(ROOT)} names {ref}, which does not exist"


def test_docs_cover_the_topics():
    text = DOCS.read_text()
    for needle in (
        "medpipe serve", "deploy/compose.yaml", "dask scheduler", "dask cuda worker", "kubectl apply -k deploy/k8s",
        "PREFECT_API_URL", "GPU=1", "PostgreSQL", "database is locked", "PREFECT_SERVER_API_AUTH_STRING",
        "Custom run", "run.json", "medpipe-process", "medpipe-docker", "medpipe-k8s",
        "PREFECT_API_AUTH_STRING", "PREFECT_AUTH_STRING", "127.0.0.1:4200", "auth-string",
        "MEDPIPE_ALLOWED_OUT_ROOTS", "--allow-out-root", "NetworkPolicy",
    ):
        assert needle in text, needle


# --------------------------------------------------------------------------------------------
# The real thing: prefect deploy on a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flow_importable() -> bool:
    if _flow_function() is None:
        return False
    proc = subprocess.run(
        [sys.executable, "-c", "import flows.archive as m; assert hasattr(m.process_archive, 'fn')"],
        cwd=ROOT, capture_output=True, timeout=300,
    )
    return proc.returncode == 0


STUB_FLOW = '''
from prefect import flow


@flow(name="medpipe-archive")
def process_archive(archive: str, out: str, config: dict | None = None, config_file: str | None = None,
                    force: bool = False, dask_address: str | None = None) -> None:
    """Stand-in with the agreed signature, used until flows/archive.py imports."""
'''


@pytest.mark.slow
def test_prefect_deploy_all_on_a_real_server(tmp_path):
    """`prefect deploy --all --prefect-file deploy/prefect.yaml` on `prefect server start`.

    Uses the real flows/archive.py when it imports; otherwise a stand-in flow with the agreed
    signature in a copy of the layout (then this checks prefect.yaml, not the flow).
    """
    if _flow_importable():
        project = ROOT
    else:
        project = tmp_path / "project"
        (project / "flows").mkdir(parents=True)
        (project / "deploy").mkdir()
        (project / "flows" / "archive.py").write_text(STUB_FLOW)
        shutil.copy(DEPLOY / "prefect.yaml", project / "deploy" / "prefect.yaml")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api,
        "COLUMNS": "200",
    }
    env.pop("PREFECT_API_AUTH_STRING", None)
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "prefect server did not start"
                time.sleep(0.5)

        def prefect(*args: str) -> str:
            proc = subprocess.run(
                [str(BIN / "prefect"), *args], env=env, cwd=project, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return proc.stdout

        prefect("work-pool", "create", "medpipe-process", "--type", "process")
        prefect("work-pool", "create", "medpipe-docker", "--type", "docker")
        prefect("work-pool", "create", "medpipe-k8s", "--type", "kubernetes",
                "--base-job-template", str(DEPLOY / "k8s" / "work-pool-medpipe-k8s.json"))
        prefect("deploy", "--all", "--no-prompt", "--prefect-file", "deploy/prefect.yaml")

        request = urllib.request.Request(
            f"{api}/deployments/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        deployments = {d["name"]: d for d in json.load(urllib.request.urlopen(request, timeout=30))}
        assert set(deployments) == set(DEPLOYMENT_POOLS)
        for name, dep in deployments.items():
            assert dep["work_pool_name"] == DEPLOYMENT_POOLS[name]
            assert dep["entrypoint"] == "flows/archive.py:process_archive"
            [schedule] = dep["schedules"]
            assert schedule["active"] and schedule["schedule"]["cron"] == "0 2 * * *"
            assert EDITABLE_PARAMETERS <= set(dep["parameter_openapi_schema"]["properties"])
        nightly = deployments["nightly"]
        [pull] = nightly["pull_steps"]
        assert Path(pull["prefect.deployments.steps.set_working_directory"]["directory"]) == project
        assert nightly["parameters"]["dask_address"] is None
        assert deployments["nightly-docker"]["job_variables"]["networks"] == ["medpipe"]

        # A custom run with other parameters, as from the UI's "Custom run".
        out = prefect("deployment", "run", "medpipe-archive/nightly", "--param", "archive=/elsewhere",
                      "--param", "force=true", "--no-watch")
        assert "'archive': '/elsewhere'" in out and "'force': True" in out
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
        log.close()
