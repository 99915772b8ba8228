"""The deployment files agree with the code: the Dockerfile installs only the runtime, every
rwood-serve command line in them is accepted by the real CLI, and ports, paths, probes, user and
drain times line up between the Dockerfile, compose and Kubernetes. (No image is built here: there
is no container daemon; see README "Scaling out".)"""
from __future__ import annotations

import re
import tomllib

import pytest
from conftest import DEPLOY, REPO, exec_form, parse_dockerfile, port_of, serve_params
from packaging.requirements import Requirement

from detector_server.probe import SERVICE_NAME
from detector_server.server import ServeConfig

RUNTIME_PACKAGES = {"onnxruntime", "onnxruntime-gpu", "faiss-cpu", "faiss-gpu"}
TRAINING_PACKAGES = {"torch", "torchvision", "onnx", "onnxscript", "scikit-learn", "matplotlib"}


def _config(params: dict) -> ServeConfig:
    """The ServeConfig rwood-serve would build from these parameters (validates their values)."""
    return ServeConfig(**{k: v for k, v in params.items() if k not in ("bundle", "verbose")})


@pytest.fixture(scope="module")
def stages() -> dict:
    return {s.name: s for s in parse_dockerfile(DEPLOY / "Dockerfile")}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---- Dockerfile ---------------------------------------------------------------------------------
def test_the_default_target_is_cpu_and_gpu_exists(stages: dict) -> None:
    assert list(stages) == ["wheel", "runtime", "gpu", "cpu"]      # the last stage is the default


def test_the_wheel_holds_the_runtime_package_only(stages: dict) -> None:
    sources = {src for text in stages["wheel"].all("COPY") for src in text.split()[:-1]}
    assert sources == {"pyproject.toml", "README.md", "detector_server/"}
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:ignore.index("**/__pycache__")] == [
        "!pyproject.toml", "!README.md", "!detector_server/"]


@pytest.mark.parametrize("stage, extra", [("cpu", "cpu"), ("gpu", "gpu")])
def test_each_image_installs_exactly_its_runtime_extra(stages: dict, stage: str, extra: str) -> None:
    installs = [t for t in stages[stage].all("RUN") if "pip install" in t]
    assert len(installs) == 1
    assert re.findall(r"\[([\w,]+)\]", installs[0]) == [extra]
    for other in ("train", "dev", "ray", "torch", "cpu" if extra == "gpu" else "gpu"):
        assert other not in installs[0]


@pytest.mark.parametrize("extra", ["cpu", "gpu"])
def test_runtime_extras_and_dependencies_hold_no_training_stack(pyproject: dict, extra: str) -> None:
    project = pyproject["project"]
    extra_names = {Requirement(r).name for r in project["optional-dependencies"][extra]}
    assert extra_names <= RUNTIME_PACKAGES
    core = {Requirement(r).name for r in project["dependencies"]}
    assert not (core | extra_names) & TRAINING_PACKAGES


def test_gpu_extra_takes_cuda_and_cudnn_from_wheels(pyproject: dict) -> None:
    reqs = {Requirement(r).name: Requirement(r) for r in pyproject["project"]["optional-dependencies"]["gpu"]}
    assert reqs["onnxruntime-gpu"].extras == {"cuda", "cudnn"}
    assert "faiss-gpu" in reqs


@pytest.mark.parametrize("stage", ["runtime", "gpu"])
def test_image_command_is_a_valid_rwood_serve_command(stages: dict, stage: str) -> None:
    assert exec_form(stages["runtime"].all("ENTRYPOINT")[-1]) == ["rwood-serve"]
    params = serve_params(exec_form(stages[stage].all("CMD")[-1]))
    config = _config(params)
    exposed = {int(p) for text in stages["runtime"].all("EXPOSE") for p in text.split()}
    assert params["bundle"] == "/bundle"
    assert {port_of(config.address), config.metrics_port} == exposed
    assert config.address.startswith("0.0.0.0:") and config.metrics_host == "0.0.0.0"
    assert config.device == ("cuda" if stage == "gpu" else "auto")


def test_healthcheck_probes_the_served_port(stages: dict) -> None:
    (check,) = stages["runtime"].all("HEALTHCHECK")
    port = port_of(serve_params(exec_form(stages["runtime"].all("CMD")[-1]))["address"])
    assert exec_form(check.split("CMD", 1)[1].strip()) == [
        "python", "-m", "detector_server.probe", f"127.0.0.1:{port}"]


def test_images_run_as_the_unprivileged_user(stages: dict, yaml_load) -> None:
    assert stages["cpu"].all("USER") == ["10001"] and stages["gpu"].all("USER") == ["10001"]
    (deployment,) = [d for d in yaml_load(DEPLOY / "k8s" / "deployment.yaml")]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


# ---- compose ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose(yaml_load) -> dict:
    (doc,) = yaml_load(DEPLOY / "compose.yaml")
    return doc


def test_compose_runs_the_image_with_a_read_only_bundle(compose: dict) -> None:
    det = compose["services"]["detector"]
    assert (DEPLOY / det["build"]["context"] / det["build"]["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile").resolve()
    assert det["build"]["target"] == "cpu"
    params = serve_params(det["command"])
    config = _config(params)
    (bundle,) = [v for v in det["volumes"] if v["target"] == params["bundle"]]
    assert bundle["read_only"] is True and bundle["type"] == "bind"
    assert det["ports"] == [f"127.0.0.1:{port_of(config.address)}:{port_of(config.address)}"]
    grace = int(det["stop_grace_period"].rstrip("s"))
    assert grace > config.grace_s >= config.drain_delay_s


def test_compose_prometheus_and_grafana_mount_files_that_exist(compose: dict, yaml_load) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    (prom,) = yaml_load(DEPLOY / "prometheus" / "prometheus.yml")
    metrics_port = _config(serve_params(compose["services"]["detector"]["command"])).metrics_port
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"detector:{metrics_port}"]


# ---- Kubernetes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s(yaml_load) -> dict:
    kustomization = yaml_load(DEPLOY / "k8s" / "kustomization.yaml")[0]
    docs = [d for f in kustomization["resources"] for d in yaml_load(DEPLOY / "k8s" / f)]
    by_kind: dict = {}
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        by_kind.setdefault(d["kind"], []).append(d)
    return by_kind


@pytest.fixture(scope="module")
def pod(k8s: dict) -> dict:
    (deployment,) = k8s["Deployment"]
    return deployment["spec"]["template"]


def test_k8s_container_command_ports_and_probes_agree(pod: dict) -> None:
    (container,) = pod["spec"]["containers"]
    config = _config(serve_params(container["args"]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": port_of(config.address), "metrics": config.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": ports["grpc"], "service": SERVICE_NAME}, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_k8s_bundle_is_read_only_and_drain_fits_in_the_grace_period(pod: dict) -> None:
    (container,) = pod["spec"]["containers"]
    params = serve_params(container["args"])
    config = _config(params)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == params["bundle"]]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.grace_s > config.drain_delay_s > 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_k8s_resources_match_the_thread_budget(pod: dict) -> None:
    (container,) = pod["spec"]["containers"]
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    config = _config(serve_params(container["args"]))
    assert config.threads == int(resources["requests"]["cpu"]) == int(resources["limits"]["cpu"])
    assert config.threads % config.workers == 0          # every worker gets an equal share


def test_k8s_services_hpa_and_pdb_select_the_deployment(k8s: dict, pod: dict) -> None:
    (deployment,) = k8s["Deployment"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for service in k8s["Service"]:
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    (hpa,) = k8s["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    (pdb,) = k8s["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_every_deploy_yaml_parses(yaml_load) -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
    assert len(files) >= 9
    for path in files:
        assert yaml_load(path), path
