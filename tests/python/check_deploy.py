"""Offline checks of everything under deploy/ and k8s/ (run by scripts/check_deploy.sh in
the .deps/venv-deploy virtual environment, with PROMTOOL set):

- the Helm chart: linted (strict) and rendered by Helm's own engine (helm-python-sdk,
  which wraps Helm's Go SDK, so no `helm` binary is needed) with its default values and
  every k8s/tessera/ci/*-values.yaml; each rendered object validated against the
  Kubernetes JSON schemas offline (kubernetes-validate, strict: unknown fields fail) for
  the oldest and newest Kubernetes the chart supports. The ServiceMonitor is a custom
  resource that kubernetes-validate has no schema for: it is validated against
  tests/python/schemas/servicemonitor-monitoring.coreos.com-v1.json instead. Then the
  things no schema sees: selectors match labels, named ports and volumes exist, GPU
  counts, probes, drain time, non-root; and values the chart must refuse are refused.
- the Grafana dashboard: generated from deploy/grafana/make_dashboard.py (in sync), its
  structure, variables and queries.
- Prometheus: `promtool check config` and `promtool check rules`.
- docker-compose.yml: services, build files, mounted paths, the scrape target.
- the Dockerfiles (no hadolint or docker daemon here): stages, every COPY source exists
  and is not excluded by .dockerignore, every workspace member is copied, non-root USER,
  ENTRYPOINT `tessera serve`, HEALTHCHECK on /health.

Prints one line per check and exits non-zero if any failed.
"""

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "tessera"
DEPLOY = ROOT / "deploy"
RELEASE, NAMESPACE = "tessera-ci", "llm"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the
# schemas know.
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.utils.latest_version()]
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        ROOT / "tests/python/schemas/servicemonitor-monitoring.coreos.com-v1.json",
}

failures = []
passed = 0


def check(name, fn, *args):
    """Runs one check; an AssertionError (or any error) fails it with its message."""
    global passed
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
        failures.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    else:
        passed += 1
        print(f"ok   {name}", flush=True)


# ---------------------------------------------------------------- Helm chart


def load_values(path):
    return yaml.safe_load(path.read_text()) if path else {}


def merged(values):
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(values)


def render(values):
    """The rendered objects (NOTES.txt aside) and NOTES.txt."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects, notes = [], ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template"] = path
                objects.append(doc)
    return objects, notes


def lint(values):
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def validate_schemas(objects):
    for obj in objects:
        doc = {k: v for k, v in obj.items() if k != "__template"}
        what = f'{obj["__template"]} ({obj["kind"]} {obj["metadata"]["name"]})'
        custom = CUSTOM_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if custom:
            schema = json.loads(custom.read_text())
            try:
                jsonschema.Draft202012Validator(schema).validate(doc)
            except jsonschema.ValidationError as e:
                raise AssertionError(f"{what}: {e.message} at {list(e.absolute_path)}")
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(
                    f"{what} on Kubernetes {version}: {e.message} at {list(e.absolute_path)}")
            except kubernetes_validate.SchemaNotFoundError as e:
                raise AssertionError(f"{what}: {e.message}")


def one(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def maybe(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) <= 1, f"more than one {kind}"
    return found[0] if found else None


def check_consistency(objects, values, notes):
    """What the schemas cannot see: the objects fit together and follow the values."""
    v = merged(values)
    deployment = one(objects, "Deployment")
    service = one(objects, "Service")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    pod_labels = pod["metadata"]["labels"]
    container = next(c for c in spec["containers"] if c["name"] == "tessera")

    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), "Deployment selector misses the pod labels"
    assert service["spec"]["selector"].items() <= pod_labels.items(), \
        "Service selector does not select the pods"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get("http") == v["port"], f"container port {ports} vs port {v['port']}"
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in ports, f"Service targetPort {p['targetPort']} not a container port"

    # Probes: all three on /health through the named port; startup allows for loading.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/health", "http"), f"{probe}: {get}"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, \
        "the startup probe allows less than 5 minutes for loading the model"

    # Graceful drain: the launcher gives the router 60 s and the shards 10 s after SIGTERM,
    # after the preStop sleep.
    pre_stop = v["preStopSleepSeconds"]
    if pre_stop:
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(pre_stop)]
    assert spec["terminationGracePeriodSeconds"] >= 70 + pre_stop, \
        f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} < drain time"

    # Non-root, no privilege escalation, read-only root with a writable /tmp.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {vol["name"]: vol for vol in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for m in container["volumeMounts"]:
        assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", "/dev/shm not in memory"
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts, "read-only root without a writable /tmp (shard sockets)"

    # The model cache follows modelCache.type.
    cache = v["modelCache"]
    pvc = maybe(objects, "PersistentVolumeClaim")
    if cache["type"] == "none":
        assert cache["mountPath"] not in mounts and pvc is None
    else:
        vol = volumes[mounts[cache["mountPath"]]]
        if cache["type"] == "emptyDir":
            assert "emptyDir" in vol and pvc is None
        elif cache["type"] == "pvc":
            assert pvc is not None, "modelCache.type pvc but no PersistentVolumeClaim"
            assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        else:
            assert pvc is None
            assert vol["persistentVolumeClaim"]["claimName"] == cache["existingClaim"]

    # Launcher settings and GPUs.
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TESSERA_NUM_SHARD"] == str(v["numShard"])
    assert env["TESSERA_REPLICAS"] == str(v["replicas"])
    assert env["TESSERA_PORT"] == str(v["port"])
    if v["model"]["path"]:
        assert env["TESSERA_MODEL"] == v["model"]["path"]
    assert env.get("TESSERA_OTLP_ENDPOINT") == (v["otlpEndpoint"] or None)
    gpus = v["numShard"] * v["replicas"]
    resources = container["resources"]
    name = v["gpu"]["resourceName"]
    if v["gpu"]["enabled"]:
        assert resources["limits"][name] == gpus and resources["requests"][name] == gpus, \
            f"{name} should be {gpus} in requests and limits: {resources}"
        assert env["TESSERA_DEVICE"].startswith("cuda")
        assert container["image"].endswith("-cuda") or v["image"]["tag"]
    else:
        assert name not in resources.get("limits", {}) and env["TESSERA_DEVICE"] == "cpu"
    args = container.get("args", [])
    if v["routerArgs"]:
        assert args[args.index("--") + 1:] == v["routerArgs"], args

    strategy = deployment["spec"].get("strategy", {})
    if strategy.get("type") == "Recreate":
        assert "rollingUpdate" not in strategy, "Recreate with rollingUpdate is rejected"

    # Optional objects.
    hpa = maybe(objects, "HorizontalPodAutoscaler")
    assert (hpa is not None) == v["autoscaling"]["enabled"]
    if hpa:
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"], "replicas set while the HPA owns them"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    monitor = maybe(objects, "ServiceMonitor")
    assert (monitor is not None) == v["metrics"]["serviceMonitor"]["enabled"]
    if monitor:
        sel = monitor["spec"]["selector"]["matchLabels"]
        assert sel.items() <= service["metadata"]["labels"].items(), \
            "ServiceMonitor does not select the Service"
        names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in names and endpoint["path"] == "/metrics"
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    pdb = maybe(objects, "PodDisruptionBudget")
    if pdb:
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    if v["serviceAccount"]["create"]:
        account = one(objects, "ServiceAccount")
        assert spec["serviceAccountName"] == account["metadata"]["name"]
    test_pod = [o for o in objects if o["kind"] == "Pod"]
    assert len(test_pod) == 1 and test_pod[0]["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert deployment["metadata"]["name"] in notes and "/generate" in notes, "NOTES.txt"


def check_refused(values, expected):
    try:
        render(values)
    except helm.HelmError as e:
        assert re.search(expected, str(e)), f"refused, but not for {expected!r}: {e}"
    else:
        raise AssertionError(f"rendered values the chart must refuse: {values}")


def chart_checks():
    value_sets = [("default values", None)] + [
        (f"ci/{p.name}", p) for p in sorted((CHART / "ci").glob("*-values.yaml"))]
    names = [n for n, _ in value_sets]
    for required in ("ci/gpu-values.yaml", "ci/multishard-values.yaml"):
        assert required in names, f"{required} missing"
    kinds = set()
    for label, path in value_sets:
        values = load_values(path)
        check(f"chart lint ({label})", lint, values)
        try:
            objects, notes = render(values)
        except Exception as e:  # noqa: BLE001
            check(f"chart render ({label})", lambda: (_ for _ in ()).throw(e))
            continue
        kinds |= {o["kind"] for o in objects}
        check(f"chart render ({label}): {len(objects)} objects", lambda: None)
        check(f"chart objects validate against Kubernetes {' and '.join(KUBE_VERSIONS)} "
              f"schemas, ServiceMonitor against its own ({label})", validate_schemas, objects)
        check(f"chart objects fit together and follow the values ({label})",
              check_consistency, objects, values, notes)
    expected = {"Deployment", "Service", "ServiceAccount", "ServiceMonitor",
                "HorizontalPodAutoscaler", "PersistentVolumeClaim", "PodDisruptionBudget", "Pod"}
    check("every template is rendered by some values set",
          lambda: (lambda missing: (_ for _ in ()).throw(AssertionError(missing))
                   if missing else None)(expected - kinds))
    refusals = [
        ({"gpu": {"enabled": True}, "device": "cpu"}, "device is cpu"),
        ({"device": "cuda"}, "gpu.enabled is false"),
        ({"modelCache": {"type": "existingClaim"}}, "existingClaim is required"),
        ({"numShard": 0}, "numShard"),
        ({"model": {"dtype": "int3"}}, "dtype"),
        ({"autoscaling": {"enabled": True, "metric": {"type": "Object"}}}, "type"),
    ]
    for values, why in refusals:
        check(f"chart refuses {json.dumps(values)}", check_refused, values, why)


# ---------------------------------------------------------------- Grafana dashboard


def dashboard_checks():
    dashboard_path = DEPLOY / "grafana/dashboards/tessera.json"

    def in_sync():
        subprocess.run([sys.executable, str(DEPLOY / "grafana/make_dashboard.py"), "--check"],
                       check=True)

    def structure():
        d = json.loads(dashboard_path.read_text())
        names = {v["name"]: v for v in d["templating"]["list"]}
        assert names["datasource"]["type"] == "datasource"
        assert names["datasource"]["query"] == "prometheus"
        for var in ("instance", "replica"):
            assert names[var]["type"] == "query" and names[var]["includeAll"], var
        ids, cells, exprs = set(), set(), 0
        for p in d["panels"]:
            assert p["id"] not in ids, f"duplicate panel id {p['id']}"
            ids.add(p["id"])
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, f"panel {p['title']} leaves the grid"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"panel {p['title']} overlaps another"
                    cells.add((x, y))
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], f"panel {p['title']} has no query"
            for t in p["targets"]:
                e = t["expr"]
                exprs += 1
                for a, b in ("()", "{}", "[]"):
                    assert e.count(a) == e.count(b), f"unbalanced {a}{b} in {e}"
                assert "tessera_" in e, e
                if "replica" in e and "replica=~" in e:
                    assert 'replica=~"$replica"' in e, e
        titles = " ".join(p["title"].lower() for p in d["panels"])
        for topic in ("requests / s", "tokens / s", "time to first token",
                      "time per output token", "end-to-end", "queue duration", "queue size",
                      "batch size", "kv cache usage", "errors", "shard health", "forward"):
            assert topic in titles, f"no panel on {topic}"
        assert exprs >= 30, exprs

    check("dashboard JSON is what make_dashboard.py writes", in_sync)
    check("dashboard structure, variables and queries", structure)


# ---------------------------------------------------------------- Prometheus and compose


def promtool(*args):
    tool = os.environ["PROMTOOL"]
    out = subprocess.run([tool, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def expand_default(text):
    """${VAR:-default} as compose reads it with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def compose_checks():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    cuda = yaml.safe_load((DEPLOY / "docker-compose.cuda.yml").read_text())
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())

    def structure():
        services = compose["services"]
        assert {"tessera", "prometheus", "grafana"} <= services.keys(), services.keys()
        for doc in (compose, cuda):
            build = doc["services"]["tessera"]["build"]
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT, f"build context {context} is not the repository root"
            assert (context / build["dockerfile"]).is_file(), build["dockerfile"]
        for name, service in services.items():
            for volume in service.get("volumes", []):
                source = expand_default(volume).split(":")[0]
                if source.startswith((".", "/")):
                    assert (DEPLOY / source).exists(), f"{name}: {source} missing"
                else:
                    assert source in compose.get("volumes", {}), f"{name}: volume {source}"
        assert "3000:3000" in services["tessera"]["ports"]
        assert services["tessera"].get("shm_size"), "no shm_size for the collectives"
        # Prometheus scrapes the tessera service on its port; Grafana's provisioning points
        # at the mounted dashboards and at the prometheus service.
        targets = [t for job in prom["scrape_configs"] if job["job_name"] == "tessera"
                   for sc in job["static_configs"] for t in sc["targets"]]
        assert targets == ["tessera:3000"], targets
        grafana_mounts = dict(expand_default(v).split(":")[:2][::-1]
                              for v in services["grafana"]["volumes"])
        provider = yaml.safe_load(
            (DEPLOY / "grafana/provisioning/dashboards/tessera.yml").read_text())
        path = provider["providers"][0]["options"]["path"]
        assert grafana_mounts.get(path) == "./grafana/dashboards", (path, grafana_mounts)
        home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert home == f"{path}/tessera.json"
        sources = yaml.safe_load(
            (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
        ds = sources["datasources"][0]
        assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
        assert cuda["services"]["tessera"]["deploy"]["resources"]["reservations"]["devices"]

    check("promtool check config deploy/prometheus/prometheus.yml",
          promtool, "check", "config", str(DEPLOY / "prometheus/prometheus.yml"))
    check("promtool check rules deploy/prometheus/tessera-rules.yml",
          promtool, "check", "rules", str(DEPLOY / "prometheus/tessera-rules.yml"))
    check("docker-compose.yml and its overlay: services, build files, mounts, scrape target",
          structure)


# ---------------------------------------------------------------- Dockerfiles


def instructions(path):
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        result.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "dangling line continuation"
    return result


def dockerignored(rel):
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(rel).parts
    for pattern in patterns:
        for i in range(1, len(parts) + 1):
            if fnmatch.fnmatch("/".join(parts[:i]), pattern.rstrip("/")):
                return pattern
    return None


def dockerfile_checks(name):
    path = DEPLOY / name
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]

    def check_file():
        stages, copied, final = [], set(), []
        for word, rest in instructions(path):
            if word == "FROM":
                m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest, re.IGNORECASE)
                assert m, f"FROM {rest}"
                base = m.group(1)
                assert base == "scratch" or base.startswith("${") or ":" in base \
                    or base in stages, f"unpinned or unknown base {base}"
                stages.append(m.group(2) or base)
                final = []
            final.append((word, rest))
            if word in ("COPY", "ADD"):
                args = shlex.split(rest)
                opts = [a for a in args if a.startswith("--")]
                paths = [a for a in args if not a.startswith("--")]
                source_stage = next((o.split("=", 1)[1] for o in opts
                                     if o.startswith("--from=")), None)
                if source_stage:
                    assert source_stage in stages[:-1], f"COPY --from={source_stage}: no such stage"
                    continue
                assert word == "COPY", "ADD of local files: use COPY"
                for src in paths[:-1]:
                    assert (ROOT / src).exists(), f"COPY {src}: not in the build context"
                    ignored = dockerignored(src)
                    assert not ignored, f"COPY {src}: excluded by .dockerignore ({ignored})"
                    copied.add(src.rstrip("/"))
        words = [w for w, _ in final]
        for required in ("USER", "ENTRYPOINT", "HEALTHCHECK", "EXPOSE"):
            assert required in words, f"the final stage has no {required}"
        user = [r for w, r in final if w == "USER"][-1]
        assert user.split(":")[0] not in ("0", "root"), f"USER {user}"
        entrypoint = json.loads([r for w, r in final if w == "ENTRYPOINT"][-1])
        assert entrypoint[-2:] == ["tessera", "serve"], entrypoint
        health = [r for w, r in final if w == "HEALTHCHECK"][-1]
        assert "/health" in health and "--start-period" in health, health
        assert "3000" in [r for w, r in final if w == "EXPOSE"][-1]
        env = " ".join(r for w, r in final if w == "ENV")
        for var in ("LD_LIBRARY_PATH", "TESSERA_MODEL"):
            assert var in env, f"no {var} in the runtime ENV"
        # The builder copies the whole context: each workspace member (and the cargo
        # files) must be in it, not left out by .dockerignore.
        assert "." in copied, "the builder does not copy the checkout (COPY . .)"
        for needed in members + ["Cargo.toml", "Cargo.lock", ".cargo", "scripts/setup.sh"]:
            assert (ROOT / needed).exists(), f"{needed} missing from the checkout"
            ignored = dockerignored(needed)
            assert not ignored, f"{needed} is excluded by .dockerignore ({ignored})"
        assert "model" in stages, "no `model` stage to replace with --build-context model=DIR"
        text = path.read_text()
        assert "cargo build --release --locked --workspace --bins" in text
        if "cuda" in name:
            assert "--features tessera-shard/cuda" in text

    check(f"{name}: stages, COPY sources, USER, ENTRYPOINT, HEALTHCHECK", check_file)


def main():
    chart_checks()
    dashboard_checks()
    compose_checks()
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        dockerfile_checks(name)
    if failures:
        print(f"check_deploy: {len(failures)} of {passed + len(failures)} checks failed: "
              + "; ".join(failures))
        sys.exit(1)
    print(f"check_deploy: all {passed} checks passed")


if __name__ == "__main__":
    main()
