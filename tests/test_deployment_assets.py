"""Offline checks of the Azure ML assets: deployment/*.yml, environment/conda.yaml, model/model.yml.

azure-ai-ml validates each YAML against the CLI v2 schemas (no Azure call, no credentials).
On top of that this file checks what the schemas do not: the 180 s request maximum, the
nesting of the timeouts, probes that survive a long request, worker count = concurrency,
code paths, and conda pins equal to environment/requirements.lock.

Each rule is a small function returning a list of problems; it is applied to the real files
(expecting none) and to deliberately broken copies (expecting some), so the rules can fail.
"""

from __future__ import annotations

import copy
import importlib.metadata as metadata
import re
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement

pytest.importorskip("azure.ai.ml", reason="azure-ai-ml is a test dependency (pip install -e .[test])")

from azure.ai.ml import (  # noqa: E402
    load_batch_endpoint,
    load_environment,
    load_model,
    load_online_deployment,
    load_online_endpoint,
)
from azure.ai.ml.entities._load_functions import load_model_batch_deployment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "deployment"
ENDPOINT_YML = DEPLOYMENT / "endpoint.yml"
GPU_YML = DEPLOYMENT / "deployment.yml"
CPU_YML = DEPLOYMENT / "deployment-cpu.yml"
BATCH_ENDPOINT_YML = DEPLOYMENT / "batch-endpoint.yml"
BATCH_YML = DEPLOYMENT / "batch-deployment.yml"
CONDA_YML = ROOT / "environment" / "conda.yaml"
LOCK = ROOT / "environment" / "requirements.lock"
REQUIREMENTS_IN = ROOT / "environment" / "requirements.in"
MODEL_YML = ROOT / "model" / "model.yml"
MODEL_README = ROOT / "model" / "README.md"
ONLINE_YMLS = [GPU_YML, CPU_YML]

MAX_REQUEST_TIMEOUT_MS = 180_000  # managed online endpoints reject more
GPU_INSTANCE_TYPE = "Standard_NC4as_T4_v3"
INFERENCE_SERVER_PIN = "1.5.1"
SAM2_PIN = "1.1.0"
VCPUS = {"Standard_NC4as_T4_v3": 4, "Standard_DS4_v2": 8, "Standard_DS3_v2": 4, "Standard_F8s_v2": 8}
GPU_SKU = re.compile(r"^Standard_N[CDV]", re.IGNORECASE)
# Never in the serving image (REFERENCE D; DESIGN "Chosen dependencies").
TEST_ONLY = {"azure-ai-ml", "pytest", "hypothesis", "ruff", "schemathesis"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def raw(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------- rules (pure functions)


def timeout_problems(env: dict, request_timeout_ms: int) -> list[str]:
    """deadline < SCORING_TIMEOUT_MS/1000 <= request_timeout_ms/1000 <= 180 and < WORKER_TIMEOUT."""
    problems = []
    for key in ("WORKER_TIMEOUT", "SCORING_TIMEOUT_MS", "MEDSAM2_REQUEST_DEADLINE_S"):
        if key not in env:
            problems.append(f"{key} is not set")
    if problems:
        return problems
    deadline_s = float(env["MEDSAM2_REQUEST_DEADLINE_S"])
    scoring_s = int(env["SCORING_TIMEOUT_MS"]) / 1000
    worker_s = int(env["WORKER_TIMEOUT"])
    request_s = request_timeout_ms / 1000
    if request_timeout_ms > MAX_REQUEST_TIMEOUT_MS:
        problems.append(
            f"request_timeout_ms {request_timeout_ms} > {MAX_REQUEST_TIMEOUT_MS} (platform maximum)"
        )
    if not deadline_s < scoring_s:
        problems.append(f"MEDSAM2_REQUEST_DEADLINE_S {deadline_s} must be < SCORING_TIMEOUT_MS {scoring_s} s")
    if not scoring_s <= request_s:
        problems.append(f"SCORING_TIMEOUT_MS {scoring_s} s must be <= request_timeout_ms {request_s} s")
    if not request_s < worker_s:
        problems.append(f"WORKER_TIMEOUT {worker_s} s must be > request_timeout_ms {request_s} s")
    if not scoring_s < worker_s:
        problems.append(f"WORKER_TIMEOUT {worker_s} s must be > SCORING_TIMEOUT_MS {scoring_s} s")
    return problems


def concurrency_problems(env: dict, max_concurrent: int | None) -> list[str]:
    if "WORKER_COUNT" not in env:
        return ["WORKER_COUNT is not set"]
    workers = int(env["WORKER_COUNT"])
    if workers < 1:
        return [f"WORKER_COUNT {workers} < 1"]
    if max_concurrent != workers:
        return [f"max_concurrent_requests_per_instance {max_concurrent} != WORKER_COUNT {workers}"]
    return []


def probe_problems(name: str, probe: dict | None, request_timeout_ms: int) -> list[str]:
    """A sync worker busy with a request cannot answer GET /: the probe must outlast a request."""
    if not probe:
        return [f"{name} is not set (the 10 s default initial_delay ignores model loading)"]
    problems = []
    period, failures = probe.get("period", 10), probe.get("failure_threshold", 30)
    if probe.get("initial_delay", 10) < 60:
        problems.append(f"{name}.initial_delay {probe.get('initial_delay')} s is too short for model loading")
    if period * failures <= request_timeout_ms / 1000:
        problems.append(
            f"{name}: period*failure_threshold = {period * failures} s <= request timeout "
            f"{request_timeout_ms / 1000} s; a busy worker would be declared dead"
        )
    if probe.get("timeout", 2) > period:
        problems.append(f"{name}.timeout exceeds its period")
    return problems


def code_problems(yml: Path, code_configuration: dict, entry: str) -> list[str]:
    code_dir = (yml.parent / code_configuration["code"]).resolve()
    problems = []
    if not code_dir.is_dir():
        return [f"code {code_configuration['code']!r} -> {code_dir} is not a directory"]
    if code_configuration.get("scoring_script") != entry:
        problems.append(f"scoring_script is {code_configuration.get('scoring_script')!r}, expected {entry!r}")
    if not (code_dir / entry).is_file():
        problems.append(f"{entry} not found in {code_dir}")
    if not (code_dir / "src" / "medsam2_endpoint" / "__init__.py").is_file():
        problems.append(f"src/medsam2_endpoint is not shipped with code {code_dir}")
    return problems


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[canon(name)] = version.strip()
    return pins


def conda_pip_entries(conda: dict) -> list[str]:
    entries = []
    for dep in conda.get("dependencies", []):
        if isinstance(dep, dict) and "pip" in dep:
            entries.extend(str(e) for e in dep["pip"])
    return entries


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;=<>!~,]+)$")


def pin_problems(pip_entries: list[str], lock: dict[str, str]) -> list[str]:
    problems = []
    for entry in pip_entries:
        m = PIN.match(entry.strip())
        if not m:
            problems.append(f"{entry!r} is not pinned as name==version")
            continue
        name, version = canon(m.group(1)), m.group(3)
        if name in TEST_ONLY:
            problems.append(f"{entry!r} is a test-only package and must stay out of the serving environment")
        elif name == "sam2":
            if version != SAM2_PIN:
                problems.append(f"sam2=={version}, expected {SAM2_PIN} (Makefile, DESIGN)")
        elif name not in lock:
            problems.append(f"{entry!r} is not in requirements.lock")
        elif lock[name] != version:
            problems.append(f"{entry!r} differs from requirements.lock ({lock[name]})")
    return problems


def env_section_problems(yml_env: dict, reference: dict) -> list[str]:
    if not isinstance(yml_env, dict):
        return [f"environment {yml_env!r} is not the inline image + conda_file environment"]
    problems = []
    for key in ("image", "conda_file"):
        if yml_env.get(key) != reference.get(key):
            problems.append(f"environment.{key} {yml_env.get(key)!r} != {reference.get(key)!r}")
    return problems


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def endpoint():
    return load_online_endpoint(ENDPOINT_YML)


@pytest.fixture(scope="module")
def online():
    return {yml.name: load_online_deployment(yml) for yml in ONLINE_YMLS}


@pytest.fixture(scope="module")
def batch():
    return load_model_batch_deployment(BATCH_YML)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_YML)


@pytest.fixture(scope="module")
def lock():
    return read_lock()


@pytest.fixture(scope="module")
def conda():
    return raw(CONDA_YML)


# ---------------------------------------------------------------- endpoints


def test_online_endpoint(endpoint):
    assert endpoint.auth_mode == "key"
    assert endpoint.name and endpoint.description


def test_batch_endpoint():
    be = load_batch_endpoint(BATCH_ENDPOINT_YML)
    assert be.name and be.description
    assert raw(BATCH_YML)["endpoint_name"] == be.name


# ---------------------------------------------------------------- online deployments


@pytest.mark.parametrize("yml", ONLINE_YMLS, ids=lambda p: p.name)
def test_online_deployment_values(yml, online, endpoint, model):
    dep = online[yml.name]
    doc = raw(yml)
    env = {k: str(v) for k, v in (dep.environment_variables or {}).items()}
    timeout_ms = dep.request_settings.request_timeout_ms
    assert dep.endpoint_name == endpoint.name
    assert dep.instance_count >= 1
    assert timeout_ms is not None and timeout_ms <= MAX_REQUEST_TIMEOUT_MS
    problems = (
        timeout_problems(env, timeout_ms)
        + concurrency_problems(env, dep.request_settings.max_concurrent_requests_per_instance)
        + probe_problems("liveness_probe", doc.get("liveness_probe"), timeout_ms)
        + probe_problems("readiness_probe", doc.get("readiness_probe"), timeout_ms)
        + code_problems(yml, doc["code_configuration"], "score.py")
    )
    assert not problems, "\n".join(problems)
    assert doc["model"] == f"azureml:{model.name}:{model.version}"
    conda_file = (yml.parent / doc["environment"]["conda_file"]).resolve()
    assert conda_file == CONDA_YML.resolve()
    assert "cuda" in doc["environment"]["image"].lower()
    # Threads per worker times workers must fit the VM (no oversubscription).
    threads = int(env.get("MEDSAM2_NUM_THREADS", "0"))
    if threads:
        assert threads * int(env["WORKER_COUNT"]) <= VCPUS[dep.instance_type]


def test_gpu_deployment(online):
    dep = online[GPU_YML.name]
    assert dep.instance_type == GPU_INSTANCE_TYPE
    assert dep.request_settings.request_timeout_ms == MAX_REQUEST_TIMEOUT_MS
    assert dep.environment_variables["WORKER_COUNT"] == "1"  # one model copy on the 16 GB T4
    assert dep.environment_variables.get("MEDSAM2_DEVICE") == "cuda"


def test_cpu_deployment(online):
    dep = online[CPU_YML.name]
    assert not GPU_SKU.match(dep.instance_type), dep.instance_type
    assert dep.instance_type in VCPUS
    assert int(dep.environment_variables["WORKER_COUNT"]) == 2
    assert dep.request_settings.max_concurrent_requests_per_instance == 2
    assert dep.environment_variables.get("MEDSAM2_DEVICE") == "cpu"


def test_all_deployments_share_one_environment_and_model():
    reference = raw(GPU_YML)
    for yml in (CPU_YML, BATCH_YML):
        doc = raw(yml)
        assert env_section_problems(doc["environment"], reference["environment"]) == [], yml.name
        assert doc["model"] == reference["model"], yml.name


def test_inline_environment_is_a_valid_environment(tmp_path):
    env = raw(GPU_YML)["environment"]
    spec = tmp_path / "environment.yml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "medsam2-serving",
                "image": env["image"],
                "conda_file": str((GPU_YML.parent / env["conda_file"]).resolve()),
            }
        )
    )
    loaded = load_environment(spec)
    assert loaded.image == env["image"]
    assert loaded.conda_file["dependencies"]  # azure-ai-ml read the conda file


def test_deployment_variables_are_accepted_by_the_service_settings():
    """The values the deployments set parse with the package's own Settings (fail-fast config)."""
    from medsam2_endpoint.core import settings as config

    for yml in ONLINE_YMLS:
        env = {k: str(v) for k, v in raw(yml)["environment_variables"].items()}
        settings = config.Settings.from_env(env, model_dir=str(ROOT / "model"))
        assert settings.request_deadline_s == float(env["MEDSAM2_REQUEST_DEADLINE_S"])
        assert settings.device == env["MEDSAM2_DEVICE"]
    env = {k: str(v) for k, v in raw(BATCH_YML)["settings"]["environment_variables"].items()}
    settings = config.Settings.from_env(env, model_dir=str(ROOT / "model"))
    assert settings.request_deadline_s == float(env["MEDSAM2_REQUEST_DEADLINE_S"])


# ---------------------------------------------------------------- batch deployment


def test_batch_deployment_values(batch, model):
    doc = raw(BATCH_YML)
    s = batch.settings
    assert doc["type"] == "model"
    problems = code_problems(BATCH_YML, doc["code_configuration"], "batch_score.py")
    assert not problems, "\n".join(problems)
    assert doc["model"] == f"azureml:{model.name}:{model.version}"
    assert batch.compute and str(doc["compute"]).startswith("azureml:")
    assert batch.resources.instance_count >= 1
    assert s.max_concurrency_per_instance >= 1
    assert 1 <= s.mini_batch_size <= 10
    assert s.output_action == "append_row"
    assert s.output_file_name
    assert s.retry_settings.max_retries == 2
    assert s.retry_settings.timeout == 600
    assert s.error_threshold == -1 or s.error_threshold >= 0
    assert str(s.logging_level).lower() in {"debug", "info", "warning"}
    # Every file of a mini-batch may use its whole deadline: the mini-batch timeout must cover them.
    deadline = float(s.environment_variables["MEDSAM2_REQUEST_DEADLINE_S"])
    assert s.mini_batch_size * deadline < s.retry_settings.timeout


# ---------------------------------------------------------------- conda environment


def test_conda_basics(conda):
    deps = conda["dependencies"]
    assert "python=3.11" in deps
    assert any(d == "pip" or (isinstance(d, str) and d.startswith("pip=")) for d in deps)


def test_conda_pins_equal_the_lock(conda, lock):
    entries = conda_pip_entries(conda)
    assert entries, "conda.yaml has no pip section"
    problems = pin_problems(entries, lock)
    assert not problems, "\n".join(problems)
    pinned = {canon(PIN.match(e).group(1)): PIN.match(e).group(3) for e in entries}
    assert pinned["azureml-inference-server-http"] == INFERENCE_SERVER_PIN
    assert pinned.get("sam2") == SAM2_PIN
    assert not TEST_ONLY & set(pinned)


def test_conda_has_no_azure_ai_ml():
    text = CONDA_YML.read_text(encoding="utf-8")
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not re.search(r"azure[-_.]ai[-_.]ml", body, re.IGNORECASE)


def test_conda_covers_every_direct_dependency(conda):
    pinned = {canon(PIN.match(e).group(1)) for e in conda_pip_entries(conda) if PIN.match(e)}
    direct = set()
    for line in REQUIREMENTS_IN.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            direct.add(canon(Requirement(line).name))
    assert not direct - pinned, f"direct dependencies not pinned in conda.yaml: {sorted(direct - pinned)}"


def test_sam2_pin_matches_makefile():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.findall(r"sam2==([\w.]+)", makefile) in ([SAM2_PIN], [])


def test_conda_pins_cover_the_installed_serving_closure(conda):
    """Every package the serving roots pull in (in this venv) is pinned, so none floats on Azure."""
    pinned = {canon(PIN.match(e).group(1)) for e in conda_pip_entries(conda) if PIN.match(e)}
    roots = [Requirement(e) for e in conda_pip_entries(conda)]
    marker_env = dict(default_environment())
    seen: set[tuple[str, frozenset]] = set()
    stack = [(canon(r.name), frozenset(r.extras)) for r in roots]
    missing = set()
    while stack:
        name, extras = stack.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here; covered by the direct-dependency test
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker and not any(req.marker.evaluate({**marker_env, "extra": e}) for e in {"", *extras}):
                continue
            dep = canon(req.name)
            if dep not in pinned and dep not in {"setuptools", "pip", "wheel"}:
                missing.add(f"{dep} (needed by {name})")
            stack.append((dep, frozenset(req.extras)))
    assert not missing, "not pinned in conda.yaml: " + ", ".join(sorted(missing))


# ---------------------------------------------------------------- model asset


def test_model_asset(model):
    assert model.name == "medsam2"
    assert model.type == "custom_model"
    assert Path(model.path).resolve() == (ROOT / "model").resolve()
    assert model.description
    readme = MODEL_README.read_text(encoding="utf-8")
    for needle in (
        "wanglab/MedSAM2",
        "MedSAM2_latest.pt",
        "156,044,156",
        "az ml model create -f model/model.yml",
    ):
        assert needle in readme, needle


# ---------------------------------------------------------------- the rules catch broken files


def test_schema_errors_are_reported(tmp_path):
    doc = raw(GPU_YML)
    doc["request_setings"] = doc.pop("request_settings")  # a typo azure-ai-ml must reject
    doc["environment"]["conda_file"] = str((GPU_YML.parent / doc["environment"]["conda_file"]).resolve())
    bad = tmp_path / "deployment.yml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(Exception, match="request_setings"):
        load_online_deployment(bad)


def test_rules_reject_broken_values(lock):
    doc = raw(GPU_YML)
    env = {k: str(v) for k, v in doc["environment_variables"].items()}
    timeout_ms = doc["request_settings"]["request_timeout_ms"]
    assert timeout_problems(env, timeout_ms) == []
    assert timeout_problems(env, 200_000)  # above the platform maximum
    assert timeout_problems({**env, "MEDSAM2_REQUEST_DEADLINE_S": "190"}, timeout_ms)
    assert timeout_problems({**env, "WORKER_TIMEOUT": "60"}, timeout_ms)
    assert timeout_problems({**env, "SCORING_TIMEOUT_MS": "3600000"}, timeout_ms)
    assert timeout_problems({k: v for k, v in env.items() if k != "WORKER_TIMEOUT"}, timeout_ms)
    assert concurrency_problems({**env, "WORKER_COUNT": "2"}, 1)
    assert concurrency_problems({}, 1)
    probe = copy.deepcopy(doc["liveness_probe"])
    assert probe_problems("liveness_probe", probe, timeout_ms) == []
    assert probe_problems("liveness_probe", {**probe, "failure_threshold": 3}, timeout_ms)
    assert probe_problems("liveness_probe", {**probe, "initial_delay": 10}, timeout_ms)
    assert probe_problems("liveness_probe", None, timeout_ms)
    code = dict(doc["code_configuration"])
    assert code_problems(GPU_YML, {**code, "scoring_script": "missing.py"}, "missing.py")
    assert code_problems(GPU_YML, {**code, "code": "."}, "score.py")  # deployment/ has no score.py
    name, version = "torch", lock["torch"]
    assert pin_problems([f"{name}=={version}"], lock) == []
    assert pin_problems([f"{name}==0.0.1"], lock)
    assert pin_problems([f"{name}>={version}"], lock)
    assert pin_problems([name], lock)
    assert pin_problems([f"azure_ai_ml=={lock['azure-ai-ml']}"], lock)
    assert pin_problems(["Simple_ITK==1"], lock)
    assert pin_problems([f"SimpleITK=={lock['simpleitk']}"], lock) == []  # case and - vs _ normalised
    assert pin_problems(["sam2==1.0"], lock)
    assert env_section_problems({"image": "x", "conda_file": "y"}, doc["environment"])
    assert env_section_problems("azureml:other:1", doc["environment"])
