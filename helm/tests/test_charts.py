"""Checks the charts with Helm's own Go SDK (helm-python-sdk, Helm v4: no helm binary),
Kubernetes' schemas (kubernetes-validate) and the real acge-proxy binary.

    python helm/tests/test_charts.py BINARY      # tests/helm.rs runs it in `make test`

For each chart and values file (the defaults, and one file per feature in
helm/tests/values/):
- the values pass the chart's values.schema.json; `lint` (strict) has no warning;
- every rendered object validates against the Kubernetes 1.29 and 1.33 schemas, in
  strict mode (an unknown field fails). The monitoring.coreos.com objects, whose CRD
  schemas are not vendored, are checked for their kind's required fields instead;
- a bad value (an unknown key, a wrong type) is refused by the schema, naming it;
- the sidecar's config, as rendered into the ConfigMap, is checked by `BINARY check`
  and then run by `BINARY run` with the container's args (paths mapped into a temp
  directory), and the probes the chart declares answer as the kubelet asks them.
Prints one line per check; exits 1 on the first failure.
"""
import copy
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import helm_python as helm
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHARTS = {
    "acge-proxy": os.path.join(ROOT, "acge-proxy"),
    "example": os.path.join(ROOT, "examples", "auth"),
}
CASES = [
    ("acge-proxy", None),
    ("acge-proxy", "service-monitor.yaml"),
    ("acge-proxy", "monitors-off.yaml"),
    ("example", None),
    ("example", "native-sidecar.yaml"),
    ("example", "pvc.yaml"),
]
KUBE = ["1.29.0", "1.33.0"]
CRD_REQUIRED = {"PrometheusRule": ["groups"], "PodMonitor": ["selector", "podMetricsEndpoints"], "ServiceMonitor": ["selector", "endpoints"], "InferenceService": ["predictor"]}
INFERENCE = os.path.join(ROOT, "examples", "inference")


def fail(msg):
    print(f"FAIL {msg}")
    sys.exit(1)


def ok(msg):
    print(f"ok   {msg}")


def with_library(chart_dir, work):
    """A copy of the chart with the library chart in its charts/ (what `helm
    dependency build` would put there)."""
    dst = os.path.join(work, os.path.basename(os.path.dirname(chart_dir)) + "-" + os.path.basename(chart_dir))
    shutil.copytree(chart_dir, dst, ignore=shutil.ignore_patterns("charts"))
    os.makedirs(os.path.join(dst, "charts"))
    shutil.copytree(os.path.join(ROOT, "acge-sidecar"), os.path.join(dst, "charts", "acge-sidecar"))
    return dst


def objects(manifests):
    for path, text in sorted(manifests.items()):
        for doc in yaml.safe_load_all(text):
            if doc:
                yield path, doc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_chart(name, values_file, work):
    chart_dir = with_library(CHARTS[name], work)
    values = yaml.safe_load(open(os.path.join(HERE, "values", values_file))) if values_file else {}
    what = f"{name} {values_file or 'defaults'}"
    chart = helm.Chart.load(chart_dir)
    chart.validate_schema(values)
    report = helm.lint(chart_dir, values, strict=True)
    bad = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    if bad:
        fail(f"{what}: lint: {bad}")
    ok(f"{what}: schema and lint")
    manifests = chart.render(values, name="auth", namespace="acgs")
    docs = list(objects(manifests))
    if not docs:
        fail(f"{what}: rendered nothing")
    for path, doc in docs:
        kind = doc["kind"]
        if kind in CRD_REQUIRED:
            missing = [k for k in CRD_REQUIRED[kind] if k not in doc.get("spec", {})]
            if doc["apiVersion"] != "monitoring.coreos.com/v1" or missing:
                fail(f"{what}: {path}: {kind} lacks {missing}")
            continue
        for version in KUBE:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{what}: {path}: {kind} {doc['metadata']['name']} on Kubernetes {version}: {e.message} at {list(e.path)}")
    kinds = sorted({d["kind"] for _, d in docs})
    ok(f"{what}: {len(docs)} objects valid on Kubernetes {', '.join(KUBE)} ({', '.join(kinds)})")
    return chart, values, docs


def check_monitoring(work):
    """The PrometheusRule carries every alert of files/alerts.yaml, with the values'
    target rate and runbook base; the dashboard ConfigMap carries files/dashboard.json."""
    chart = helm.Chart.load(with_library(CHARTS["acge-proxy"], work))
    values = {"monitoring": {"targetRps": 250, "runbookBase": "https://runbooks.example/acge#"}}
    docs = [d for _, d in objects(chart.render(values, name="auth", namespace="acgs"))]
    source = yaml.safe_load(open(os.path.join(CHARTS["acge-proxy"], "files", "alerts.yaml")))
    want = [r["alert"] for g in source["groups"] for r in g["rules"]]
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    got = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    if sorted(got) != sorted(want):
        fail(f"PrometheusRule alerts {sorted(got)} are not files/alerts.yaml's {sorted(want)}")
    if not got["ACGEThroughputLow"]["expr"].rstrip().endswith("< 250"):
        fail(f"the target rate is not substituted: {got['ACGEThroughputLow']['expr']}")
    if not all(r["annotations"]["runbook_url"].startswith("https://runbooks.example/acge#") for r in got.values()):
        fail("a runbook_url does not start with monitoring.runbookBase")
    board = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    if json.loads(board["data"]["acge-proxy.json"]) != json.load(open(os.path.join(CHARTS["acge-proxy"], "files", "dashboard.json"))):
        fail("the dashboard ConfigMap is not files/dashboard.json")
    ok(f"PrometheusRule: the {len(want)} alerts of files/alerts.yaml, target and runbook base from values; dashboard ConfigMap: files/dashboard.json")


def expect_refused(name, values, needle, work):
    chart = helm.Chart.load(with_library(CHARTS[name], work))
    try:
        chart.validate_schema(values)
    except helm.HelmValuesError as e:
        if needle not in str(e):
            fail(f"{name}: {values} refused, but the message does not name {needle!r}: {e}")
        ok(f"{name}: {json.dumps(values)} refused: {str(e).splitlines()[-1].strip()}")
        return
    fail(f"{name}: {values} was accepted")


def check_restart_annotation(work):
    """The pod annotation changes with the sections a reload cannot change, and only
    with them: a route's weight reloads in place, a listener setting rolls the pods."""
    chart = helm.Chart.load(with_library(CHARTS["example"], work))

    def annotation(change):
        values = {"sidecar": {"config": copy.deepcopy(chart.values["sidecar"]["config"])}}
        change(values["sidecar"]["config"])
        docs = [d for _, d in objects(chart.render(values, name="auth", namespace="acgs"))]
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/acge-restart-config"]

    base = annotation(lambda c: None)
    weight = annotation(lambda c: c["routes"][0].__setitem__("green_weight", 42))
    listener = annotation(lambda c: c.setdefault("listener", {}).__setitem__("max_connections", 77))
    if weight != base:
        fail("a route's weight changed the restart annotation: it would roll the pods")
    if listener == base:
        fail("a listener setting left the restart annotation as it was: the pods would not roll")
    ok("restart annotation: a weight reloads in place, a listener change rolls the pods")


def check_inference(work):
    """helm/examples/inference: the chart's values for a shared tier render a config
    whose acge filter scores remotely (and pass the schema); the InferenceService
    manifest has its kind's required fields."""
    import yaml
    chart = helm.Chart.load(with_library(CHARTS["acge-proxy"], work))
    with open(os.path.join(INFERENCE, "values-remote.yaml")) as f:
        values = yaml.safe_load(f)
    chart.validate_schema(values)
    docs = [d for _, d in objects(chart.render(values, name="auth", namespace="acgs"))]
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    remote = config["filters"]["acge"].get("remote")
    want = {"endpoint": "http://acge-encoder-predictor.acge.svc:9000", "model": "acge-encoder", "fallback": "local",
            "inputs": ["INPUT__0", "INPUT__1"], "output": "OUTPUT__0", "timeout_ms": 250, "max_in_flight": 4, "version": ""}
    if remote != want:
        fail(f"values-remote.yaml renders filters.acge.remote {remote}, not {want}")
    with open(os.path.join(INFERENCE, "kserve", "inferenceservice.yaml")) as f:
        isvc = yaml.safe_load(f)
    for key in ["apiVersion", "kind", "metadata"]:
        if key not in isvc:
            fail(f"inferenceservice.yaml lacks {key}")
    missing = [k for k in CRD_REQUIRED[isvc["kind"]] if k not in isvc.get("spec", {})]
    if missing or not isvc["apiVersion"].startswith("serving.kserve.io/"):
        fail(f"inferenceservice.yaml: {isvc['apiVersion']} {isvc['kind']} lacks {missing}")
    model = isvc["spec"]["predictor"]["model"]
    if model.get("protocolVersion") not in ("v2", "grpc-v2"):
        fail(f"the InferenceService does not speak the Open Inference Protocol: {model.get('protocolVersion')}")
    ok("inference example: values-remote.yaml renders filters.acge.remote; the InferenceService has its required fields")


def expect_render_refused(name, values, needle, work):
    chart = helm.Chart.load(with_library(CHARTS[name], work))
    try:
        list(objects(chart.render(values, name="auth", namespace="acgs")))
    except Exception as e:  # the SDK raises what Helm's `fail` said
        if needle not in str(e):
            fail(f"{name}: {values} refused at render, but the message does not name {needle!r}: {e}")
        ok(f"{name}: {json.dumps(values)} refused at render: {needle}")
        return
    fail(f"{name}: {values} rendered")


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def run_sidecar(binary, work):
    """Renders the example with its blue cluster on a local upstream, then runs the
    sidecar container as the pod would: its args, its ConfigMap, its paths."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    proxy, admin = free_port(), free_port()
    chart = helm.Chart.load(with_library(CHARTS["example"], work))
    values = {"sidecar": {"ports": {"proxy": proxy, "admin": admin}, "config": copy.deepcopy(chart.values["sidecar"]["config"])}}
    values["sidecar"]["config"]["clusters"]["auth-blue"]["endpoints"] = [f"127.0.0.1:{upstream.server_address[1]}"]
    values["sidecar"]["config"]["clusters"]["auth-green"]["endpoints"] = [f"127.0.0.1:{upstream.server_address[1]}"]
    docs = [d for _, d in objects(chart.render(values, name="auth", namespace="acgs"))]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "acge-proxy")
    root = os.path.join(work, "pod")
    mounts = {m["mountPath"]: os.path.join(root, m["name"]) for m in container["volumeMounts"]}
    for path in mounts.values():
        os.makedirs(path)
    with open(os.path.join(mounts["/etc/acge"], "config.yaml"), "w") as f:
        f.write(config)
    with open(os.path.join(mounts["/var/run/acge/token"], "token"), "w") as f:
        f.write("test-token\n")

    def mapped(text):
        for inside, outside in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(inside, outside)
        return text.replace("0.0.0.0:", "127.0.0.1:")

    with open(os.path.join(mounts["/etc/acge"], "config.yaml"), "w") as f:
        f.write(mapped(config))
    args = [mapped(a) for a in container["args"]]
    if args[:2] != ["run", "--config"]:
        fail(f"the container's args are {container['args']}")
    out = subprocess.run([binary, "check", "--config", args[2]], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.startswith("OK:"):
        fail(f"acge-proxy check of the rendered config: {out.stdout}{out.stderr}")
    ok(f"the rendered config passes `acge-proxy check`: {out.stdout.strip()}")
    proc = subprocess.Popen([binary] + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
            spec = container[probe]["httpGet"]
            url = f"http://127.0.0.1:{ports[spec['port']]}{spec['path']}"
            deadline = time.time() + 30
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        code = r.status
                except urllib.error.HTTPError as e:
                    code = e.code
                except OSError:
                    code = None
                # The kubelet counts 200–399 as success.
                if code is not None and 200 <= code < 400:
                    break
                if time.time() > deadline or proc.poll() is not None:
                    fail(f"{probe} {url}: {code}; the proxy said: {proc.stderr.read() if proc.poll() is not None else ''}")
                time.sleep(0.2)
            ok(f"{probe} GET {spec['path']} on port {spec['port']}: {code}")
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy}/api/v1/auth/x", timeout=5) as r:
            if r.status != 200:
                fail(f"a request through the sidecar: {r.status}")
        ok("a request through the sidecar's port reaches the legacy upstream")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        upstream.shutdown()
    if not os.listdir(os.path.join(mounts["/var/lib/acge"], "audit")):
        fail("no audit log on the state volume")
    ok("the audit log is written to the state volume")


def main():
    binary = sys.argv[1]
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}")
    with tempfile.TemporaryDirectory() as work:
        for i, (name, values_file) in enumerate(CASES):
            check_chart(name, values_file, os.path.join(work, str(i)))
        check_monitoring(os.path.join(work, "monitoring"))
        refused = [
            ("acge-proxy", {"sidecar": {"natve": True}}, "natve"),
            ("acge-proxy", {"service": {"port": "http"}}, "/service/port"),
            ("acge-proxy", {"monitoring": {"scrape": "sometimes"}}, "/monitoring/scrape"),
            ("example", {"sidecar": {"state": {"kind": "hostPath"}}}, "/sidecar/state/kind"),
        ]
        for i, (name, values, needle) in enumerate(refused):
            expect_refused(name, values, needle, os.path.join(work, f"bad{i}"))
        # A grace period shorter than the drain would let the kubelet kill it mid-way.
        short = {"sidecar": {"terminationGracePeriodSeconds": 12, "preStopSeconds": 5,
                             "config": {"listener": {"drain_timeout_ms": 10000}}}}
        expect_render_refused("acge-proxy", short, "below the drain it must cover", os.path.join(work, "grace"))
        check_restart_annotation(os.path.join(work, "annotation"))
        check_inference(os.path.join(work, "inference"))
        no_acge = {"sidecar": {"inference": {"endpoint": "http://tier:9000"}}}
        expect_render_refused("acge-proxy", no_acge, "needs sidecar.config.filters.acge", os.path.join(work, "inference-bad"))
        run_sidecar(binary, os.path.join(work, "run"))
    print("all chart checks passed")


if __name__ == "__main__":
    main()
