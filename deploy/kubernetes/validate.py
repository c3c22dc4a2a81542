"""Offline checks of deploy/container and deploy/kubernetes.

Run by validate.sh, which makes the venv this needs; prints one line per
check (`ok`, `SKIPPED (why)`, `FAIL`) and exits 1 when any check failed.

    python3 deploy/kubernetes/validate.py --kubectl PATH --hadolint PATH [--emulate]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
WORK = ROOT / "target" / "k8s-validate"

# Kubernetes versions the manifests are checked against: the oldest with the
# securityContext.appArmorProfile field (1.30) and the newest whose schemas
# kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", "1.37.0"]

# What the daemon needs, each for a reason written next to it in
# daemonset.yaml and in README.md; the manifest and the README must both say
# exactly this.
CAPABILITIES = {
    "BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "CHOWN",
    "DAC_OVERRIDE", "KILL",
}
HOST_PATHS = {
    "/sys/fs/cgroup": "/sys/fs/cgroup",
    "/sys/fs/bpf": "/sys/fs/bpf",
    "/var/lib/agent-guard": "/var/lib/agent-guard",
    "/run/agent-guard": "/run/agent-guard",
}

# Kinds kustomize leaves without a namespace.
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
CRD_FILE = K8S / "crd" / "agentguardpolicy.yaml"
SAMPLE_FILE = K8S / "crd" / "sample-policy.yaml"

failures: list[str] = []
counts = {"ok": 0, "skipped": 0}
strict = os.environ.get("AGENT_GUARD_VALIDATE_STRICT") == "1"


def ok(check: str, detail: str = "") -> None:
    counts["ok"] += 1
    print(f"ok       {check}" + (f": {detail}" if detail else ""))


def skipped(check: str, why: str, *, tool_missing: bool = False) -> None:
    """A check that cannot run here. In strict mode (CI) a missing tool that
    validate.sh should have installed is a failure, not a skip."""
    if tool_missing and strict:
        fail(check, f"{why} (strict mode: the tool must be there)")
        return
    counts["skipped"] += 1
    print(f"SKIPPED  {check} ({why})")


def fail(check: str, detail: str) -> None:
    failures.append(check)
    print(f"FAIL     {check}: {detail}")


def note(check: str, detail: str) -> None:
    print(f"note     {check}: {detail}")


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---------------------------------------------------------------------------
# Containerfile
# ---------------------------------------------------------------------------


def check_containerfile(hadolint: str | None) -> None:
    if hadolint and Path(hadolint).exists():
        r = subprocess.run([hadolint, "--no-color", str(CONTAINERFILE)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            ok("Containerfile: hadolint", "no findings (DL3002, DL3008 ignored in place, with reasons)")
        else:
            fail("Containerfile: hadolint", (r.stdout + r.stderr).strip())
    else:
        skipped("Containerfile: hadolint", "hadolint not installed", tool_missing=True)

    try:
        from dockerfile_parse import DockerfileParser
    except ImportError:
        skipped("Containerfile: structure", "dockerfile-parse not installed", tool_missing=True)
        return
    with open(CONTAINERFILE, "rb") as f:
        parser = DockerfileParser(fileobj=f)
        structure = parser.structure
    stages: list[dict] = []
    for ins in structure:
        name, value = ins["instruction"], ins["value"]
        if name == "FROM":
            parts = value.split()
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"from": parts[0], "alias": alias, "ins": []})
        elif stages:
            stages[-1]["ins"].append((name, value))
    problems = []
    if len(stages) != 2:
        problems.append(f"{len(stages)} stages, expected 2 (builder, runtime)")
    else:
        builder, runtime = stages
        if builder["alias"] != "builder":
            problems.append("the first stage is not named `builder`")
        runs = " ".join(v for n, v in builder["ins"] if n == "RUN")
        if "cargo xtask build --release" not in runs:
            problems.append("the builder does not run `cargo xtask build --release`")
        if "rust-src" not in runs or "bpf-linker" not in runs or "llvm-22" not in runs:
            problems.append("the builder lacks one of nightly rust-src, bpf-linker, LLVM 22")
        base = runtime["from"].split("/")[-1]
        if not (base.startswith("debian:12-slim") or "distroless" in runtime["from"]):
            problems.append(f"runtime base {runtime['from']} is neither debian:12-slim nor distroless")
        copies = [v for n, v in runtime["ins"] if n == "COPY"]
        if not any(v.startswith("--from=builder") and "agent-guard" in v for v in copies):
            problems.append("the runtime stage does not COPY the binary from the builder")
        users = [v for n, v in runtime["ins"] if n == "USER"]
        if users[-1:] != ["0:0"]:
            problems.append(f"the runtime's last USER is {users[-1:] or 'unset'}, expected an explicit 0:0")
        entry = [v for n, v in runtime["ins"] if n == "ENTRYPOINT"]
        if entry != ['["/usr/local/bin/agent-guard"]']:
            problems.append(f"ENTRYPOINT is {entry}, expected exec form /usr/local/bin/agent-guard")
        # Every crate the build needs is copied into the builder (a new
        # workspace member would otherwise break only the image build).
        ws = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]
        needed = set(ws.get("members", [])) | set(ws.get("exclude", [])) | {"Cargo.toml", "Cargo.lock", ".cargo"}
        copied: set[str] = set()
        for n, v in builder["ins"]:
            if n == "COPY" and not v.startswith("--from"):
                copied.update(p.rstrip("/") for p in v.split()[:-1])
        missing = sorted(needed - copied)
        if missing:
            problems.append(f"the builder does not COPY {', '.join(missing)}")
    if problems:
        fail("Containerfile: structure", "; ".join(problems))
    else:
        ok("Containerfile: structure",
           "stages builder -> debian:12-slim, cargo xtask build --release, every workspace crate copied, "
           "explicit USER 0:0, exec-form ENTRYPOINT")

    # The pinned nightly and bpf-linker should be the ones this project
    # builds with; a difference is worth a look, not a failure.
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", CONTAINERFILE.read_text(), re.M))
    nightly = args.get("RUST_NIGHTLY", "")
    try:
        sysroot = subprocess.run(["rustc", "+nightly", "--print", "sysroot"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        manifest = Path(sysroot) / "lib" / "rustlib" / "multirust-channel-manifest.toml"
        date = tomllib.loads(manifest.read_text()).get("date")
        if nightly == f"nightly-{date}":
            ok("Containerfile: RUST_NIGHTLY", f"{nightly} is this machine's nightly")
        else:
            note("Containerfile: RUST_NIGHTLY", f"{nightly}, this machine's nightly is nightly-{date}")
    except (OSError, subprocess.CalledProcessError, tomllib.TOMLDecodeError):
        skipped("Containerfile: RUST_NIGHTLY", "no nightly toolchain here to compare with")
    try:
        out = subprocess.run(["bpf-linker", "--version"], capture_output=True, text=True,
                             check=True).stdout.split()
        have = out[-1] if out else "?"
        if have == args.get("BPF_LINKER_VERSION"):
            ok("Containerfile: BPF_LINKER_VERSION", f"{have} is this machine's bpf-linker")
        else:
            note("Containerfile: BPF_LINKER_VERSION", f"{args.get('BPF_LINKER_VERSION')}, this machine has {have}")
    except (OSError, subprocess.CalledProcessError):
        skipped("Containerfile: BPF_LINKER_VERSION", "no bpf-linker here to compare with")

    skipped("container image build",
            "no container runtime here, and no container registry to pull the base images from; "
            "buildah 1.28 (Debian 12) parses the file but cannot pull docker.io/library/rust")


# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------


def kustomization_structure(directory: Path) -> list[dict] | None:
    """Without kustomize: every listed resource and generator file exists and
    parses. Returns the raw objects (namespace applied), or None on failure."""
    check = f"kustomization {directory.relative_to(ROOT)}: files"
    try:
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(check, str(e))
        return None
    if k.get("kind") != "Kustomization" or not str(k.get("apiVersion", "")).startswith("kustomize.config.k8s.io/"):
        fail(check, "not a kustomize.config.k8s.io Kustomization")
        return None
    objs, problems = [], []
    for res in k.get("resources", []):
        p = directory / res
        if not p.is_file():
            problems.append(f"{res}: missing")
            continue
        try:
            docs = load_yaml_docs(p)
        except yaml.YAMLError as e:
            problems.append(f"{res}: {e}")
            continue
        for d in docs:
            if not {"apiVersion", "kind", "metadata"} <= d.keys():
                problems.append(f"{res}: an object without apiVersion/kind/metadata")
            objs.append(d)
    for gen in k.get("configMapGenerator", []):
        data = {}
        for f in gen.get("files", []):
            p = directory / f
            if not p.is_file():
                problems.append(f"configMapGenerator {gen.get('name')}: {f} missing")
            else:
                data[p.name] = p.read_text()
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    if problems:
        fail(check, "; ".join(problems))
        return None
    ns = k.get("namespace")
    for o in objs:
        if ns and o["kind"] not in CLUSTER_SCOPED:
            o["metadata"]["namespace"] = ns
    ok(check, f"{len(objs)} objects, every resource and generator file present and parsed")
    return objs


def kustomize_build(kubectl: str | None, directory: Path) -> list[dict] | None:
    check = f"kustomize build {directory.relative_to(ROOT)}"
    if not kubectl or not Path(kubectl).exists():
        skipped(check, "no kubectl (kustomize) here; the objects are checked as written",
                tool_missing=True)
        return None
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout
    kv = re.search(r"Kustomize Version: (\S+)", version)
    r = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    if r.returncode != 0:
        fail(check, r.stderr.strip())
        return None
    objs = [d for d in yaml.safe_load_all(r.stdout) if d]
    ok(check, f"{len(objs)} objects (kubectl kustomize, kustomize {kv.group(1) if kv else '?'})")
    return objs


def schema_validate(objs: list[dict], label: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        skipped(f"{label}: schemas", "kubernetes-validate not installed", tool_missing=True)
        return
    for version in K8S_VERSIONS:
        problems, count = [], 0
        for o in objs:
            if o.get("apiVersion", "").startswith("monitoring.coreos.com/"):
                continue
            count += 1
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{o['kind']}/{o['metadata'].get('name')}: {path}: {e.message}")
            except Exception as e:  # schema not found and the like
                problems.append(f"{o['kind']}/{o['metadata'].get('name')}: {getattr(e, 'message', e)}")
        if problems:
            fail(f"{label}: schemas, Kubernetes {version} (strict)", "; ".join(problems))
        else:
            ok(f"{label}: schemas, Kubernetes {version} (strict)",
               f"{count} objects valid (kubernetes-validate {kubernetes_validate.version.__version__}, "
               "unknown fields refused)")


def strip_unset(value):
    if isinstance(value, dict):
        return {k: strip_unset(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_unset(v) for v in value]
    return value


def servicemonitor_validate(objs: list[dict]) -> None:
    sms = [o for o in objs if o.get("kind") == "ServiceMonitor"]
    check = "ServiceMonitor: CRD schema"
    if not sms:
        fail(check, "no ServiceMonitor")
        return
    try:
        from cloudcoil.models.prometheus_operator import v1 as po
        from importlib.metadata import version
        import pydantic
    except ImportError:
        skipped(check, "cloudcoil-models-prometheus-operator not installed", tool_missing=True)
        return
    for sm in sms:
        try:
            model = po.ServiceMonitor.model_validate(sm)
        except pydantic.ValidationError as e:
            fail(check, str(e).replace("\n", " "))
            continue
        # The models accept and drop unknown fields; the API server (strict
        # field validation, kubectl's default) refuses them. Compare.
        back = strip_unset(model.model_dump(by_alias=True, exclude_unset=True, mode="json"))
        dropped = diff_keys(sm, back, "")
        if dropped:
            fail(check, f"fields the CRD does not define: {', '.join(dropped)}")
        else:
            ok(check, "valid against the Prometheus Operator's ServiceMonitor schema "
                      f"(pydantic models generated from its CRD: cloudcoil-models-prometheus-operator "
                      f"{version('cloudcoil.models.prometheus_operator')}), no unknown fields")


def diff_keys(a, b, path: str) -> list[str]:
    out = []
    if isinstance(a, dict):
        for k, v in a.items():
            p = f"{path}.{k}" if path else k
            if not isinstance(b, dict) or k not in b:
                out.append(p)
            else:
                out.extend(diff_keys(v, b[k], p))
    elif isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(diff_keys(x, y, f"{path}[{i}]"))
    return out


def one(objs: list[dict], kind: str) -> dict | None:
    found = [o for o in objs if o.get("kind") == kind]
    return found[0] if len(found) == 1 else None


def daemon_args(container: dict) -> dict[str, str]:
    out = {}
    for a in container.get("args", []):
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
    return out


def semantic_checks(objs: list[dict], monitoring: list[dict]) -> None:
    """What schemas cannot see: references between objects, and what the
    daemon needs from its pod."""
    check = "manifests: daemon's needs and cross-references"
    problems: list[str] = []
    ns = one(objs, "Namespace")
    ds = one(objs, "DaemonSet")
    svc = one(objs, "Service")
    cm = one(objs, "ConfigMap")
    sa = one(objs, "ServiceAccount")
    if not all([ns, ds, svc, cm, sa]):
        fail(check, "expected exactly one Namespace, ServiceAccount, ConfigMap, DaemonSet and Service")
        return
    name = ns["metadata"]["name"]
    for o in objs:
        if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") != name:
            problems.append(f"{o['kind']}/{o['metadata']['name']} is not in namespace {name}")
    if ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") != "privileged":
        problems.append("the namespace does not enforce Pod Security `privileged` (the baseline refuses hostPID, hostPath, SYS_ADMIN)")

    pod = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"].get("labels", {})
    if not ds["spec"]["selector"]["matchLabels"].items() <= labels.items():
        problems.append("the DaemonSet's selector does not match its pod labels")
    if pod.get("serviceAccountName") != sa["metadata"]["name"]:
        problems.append("the pod does not use the ServiceAccount")
    if pod.get("hostPID") is not True:
        problems.append("hostPID is not true (PROCS is keyed by host pids)")
    if pod.get("priorityClassName") != "system-node-critical":
        problems.append("priorityClassName is not system-node-critical")
    if {"operator": "Exists"} not in pod.get("tolerations", []):
        problems.append("no toleration of every taint (operator: Exists)")
    (c,) = pod["containers"]
    sc = c.get("securityContext", {})
    caps = set(sc.get("capabilities", {}).get("add", []))
    if caps != CAPABILITIES:
        problems.append(f"capabilities {sorted(caps)} differ from the documented {sorted(CAPABILITIES)}")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities are not dropped first (drop: [ALL])")
    if sc.get("privileged") is not False:
        problems.append("privileged is not false")
    if sc.get("allowPrivilegeEscalation") is False and "SYS_ADMIN" in caps:
        problems.append("allowPrivilegeEscalation: false with SYS_ADMIN is refused by the API server")
    if sc.get("runAsUser") != 0:
        problems.append("runAsUser is not 0 (the daemon refuses any other uid)")
    res = c.get("resources", {})
    if not (res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")):
        problems.append("resources lack cpu/memory requests or a memory limit")

    # Volumes: the host paths the daemon needs, mounted where its flags say.
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    for host, inside in HOST_PATHS.items():
        m = mounts.get(inside)
        v = vols.get(m["name"]) if m else None
        if not v or v.get("hostPath", {}).get("path") != host:
            problems.append(f"hostPath {host} is not mounted at {inside}")
    bpf = mounts.get("/sys/fs/bpf", {})
    if bpf.get("mountPropagation") not in ("HostToContainer", "Bidirectional"):
        problems.append("/sys/fs/bpf has no mount propagation from the host")
    if bpf.get("mountPropagation") == "Bidirectional" and not sc.get("privileged"):
        problems.append("Bidirectional mount propagation needs privileged: true")

    args = daemon_args(c)
    policy = args.get("policy", "")
    pm = [m for m in c.get("volumeMounts", []) if policy.startswith(m["mountPath"].rstrip("/") + "/")]
    if not pm or vols.get(pm[0]["name"], {}).get("configMap", {}).get("name") != cm["metadata"]["name"]:
        problems.append(f"--policy {policy!r} is not a file of the policy ConfigMap's mount")
    elif Path(policy).name not in cm.get("data", {}):
        problems.append(f"the ConfigMap has no key {Path(policy).name}")
    for flag in ("socket", "pin-dir", "audit-dir", "state-dir"):
        p = args.get(flag, "")
        if not any(p == mp or p.startswith(mp.rstrip("/") + "/") for mp in mounts):
            problems.append(f"--{flag} {p!r} is not on a mounted volume")
    addr = args.get("metrics-addr", "")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if not addr.startswith("0.0.0.0:") or int(addr.rsplit(":", 1)[1]) != ports.get("metrics"):
        problems.append(f"--metrics-addr {addr!r} does not bind 0.0.0.0 on the metrics port {ports.get('metrics')}")
    if "--node-id=$(NODE_NAME)" not in c.get("args", []) or not any(
            e.get("name") == "NODE_NAME" and e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName"
            for e in c.get("env", [])):
        problems.append("--node-id is not the node's name (launch tokens' aud)")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        hg = c.get(probe, {}).get("httpGet", {})
        if hg.get("path") != path or hg.get("port") not in ("metrics", ports.get("metrics")):
            problems.append(f"{probe} is not GET {path} on the metrics port")
    script = " ".join(c.get("command", []))
    if "nsenter --cgroup=/proc/1/ns/cgroup" not in script or "bpf_fs" not in script:
        problems.append("the command does not check bpffs and join the node's cgroup namespace")

    # Service and ServiceMonitor point at the pods' metrics port.
    if not svc["spec"]["selector"].items() <= labels.items():
        problems.append("the Service's selector does not match the pods")
    sp = [p for p in svc["spec"]["ports"] if p.get("name") == "metrics"]
    if not sp or sp[0].get("targetPort") not in ("metrics", ports.get("metrics")):
        problems.append("the Service has no `metrics` port targeting the pods' metrics port")
    for sm in (o for o in monitoring if o.get("kind") == "ServiceMonitor"):
        if not sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"].get("labels", {}).items():
            problems.append("the ServiceMonitor does not select the Service")
        if name not in sm["spec"].get("namespaceSelector", {}).get("matchNames", []):
            problems.append("the ServiceMonitor does not look in the daemon's namespace")
        if not any(e.get("port") == "metrics" for e in sm["spec"]["endpoints"]):
            problems.append("the ServiceMonitor does not scrape the `metrics` port")
        if sm["metadata"].get("namespace") != name:
            problems.append("the ServiceMonitor is not in the daemon's namespace")
    if problems:
        fail(check, "; ".join(problems))
    else:
        ok(check, "hostPID, host mounts match the daemon's flags, policy from the ConfigMap, "
                  "metrics on 0.0.0.0:9753 with /readyz and /healthz probes, capabilities as documented, "
                  "Service and ServiceMonitor select the pods")


def rbac_checks(objs: list[dict]) -> None:
    """The ClusterRole is what --policy-source kubernetes needs (README.md,
    "Policy as a resource"), bound to the daemon's ServiceAccount."""
    check = "RBAC: AgentGuardPolicy watch and Events"
    role, binding, sa = one(objs, "ClusterRole"), one(objs, "ClusterRoleBinding"), one(objs, "ServiceAccount")
    if not (role and binding and sa):
        fail(check, "expected exactly one ClusterRole, ClusterRoleBinding and ServiceAccount")
        return
    problems = []
    granted = {(g, r): set(rule.get("verbs", []))
               for rule in role.get("rules", []) for g in rule.get("apiGroups", []) for r in rule.get("resources", [])}
    want = {("agent-guard.io", "agentguardpolicies"): {"get", "list", "watch"},
            ("events.k8s.io", "events"): {"create", "patch"}}
    for key, verbs in want.items():
        if granted.get(key) != verbs:
            problems.append(f"{key[0]}/{key[1]}: verbs {sorted(granted.get(key, []))}, expected {sorted(verbs)}")
    extra = set(granted) - set(want)
    if extra:
        problems.append(f"grants more than needed: {sorted(extra)}")
    ref = binding.get("roleRef", {})
    if ref.get("kind") != "ClusterRole" or ref.get("name") != role["metadata"]["name"]:
        problems.append("the ClusterRoleBinding does not refer to the ClusterRole")
    subj = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"].get("namespace")}
    if subj not in binding.get("subjects", []):
        problems.append(f"the ClusterRoleBinding does not bind {subj}")
    if problems:
        fail(check, "; ".join(problems))
    else:
        ok(check, "get/list/watch agentguardpolicies, create/patch events.k8s.io events, bound to the ServiceAccount, nothing more")


def structural_problems(schema, path: str = "") -> list[str]:
    """Kubernetes' structural schema rules that matter for a generated
    schema: a type on every node, no references or combinators, no
    additionalProperties beside properties."""
    out = []
    if not isinstance(schema, dict):
        return [f"{path or '.'}: not an object"]
    for key in ("$ref", "anyOf", "oneOf", "allOf", "not", "definitions", "$schema"):
        if key in schema:
            out.append(f"{path or '.'}: {key}")
    if "type" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.append(f"{path or '.'}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        out.append(f"{path or '.'}: properties and additionalProperties")
    for k, v in schema.get("properties", {}).items():
        out.extend(structural_problems(v, f"{path}.{k}"))
    if "items" in schema:
        out.extend(structural_problems(schema["items"], f"{path}[]"))
    return out


def strict(schema, under_metadata: bool = False):
    """The schema as the API server applies it with strict field validation
    (kubectl's default): unknown fields refused, except in metadata."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v, k == "metadata") for k, v in out["properties"].items()}
        out["additionalProperties"] = False
    if "items" in out:
        out["items"] = strict(out["items"])
    if out.get("nullable"):
        out["type"] = [out["type"], "null"]
    return out


def crd_checks(objs: list[dict], binary: str | None) -> None:
    """The AgentGuardPolicy CRD: a valid apiextensions.k8s.io/v1 object
    (schemas: schema_validate), structural, generated from the code, and
    the sample object valid against it."""
    check = "AgentGuardPolicy CRD: structural schema"
    try:
        crd = yaml.safe_load(CRD_FILE.read_text())
        sample = yaml.safe_load(SAMPLE_FILE.read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(check, str(e))
        return
    built = [o for o in objs if o.get("kind") == "CustomResourceDefinition"]
    if len(built) != 1 or built[0] != crd:
        fail("AgentGuardPolicy CRD: in the base", f"{CRD_FILE.relative_to(ROOT)} is not in the kustomization as is")
    else:
        ok("AgentGuardPolicy CRD: in the base", "kustomize passes the generated file through unchanged")
    versions = crd.get("spec", {}).get("versions", [])
    if len(versions) != 1 or not versions[0].get("storage"):
        fail(check, "expected one served, stored version")
        return
    schema = versions[0].get("schema", {}).get("openAPIV3Schema")
    problems = structural_problems(schema)
    if problems:
        fail(check, "; ".join(problems))
    else:
        ok(check, "types everywhere, no $ref/anyOf/oneOf/allOf, no additionalProperties beside properties")

    if binary:
        r = subprocess.run([binary, "generate", "crd"], capture_output=True, text=True)
        if r.returncode != 0:
            fail("AgentGuardPolicy CRD: generated", r.stderr.strip())
        elif r.stdout != CRD_FILE.read_text():
            fail("AgentGuardPolicy CRD: generated",
                 f"`agent-guard generate crd` differs from {CRD_FILE.relative_to(ROOT)}; regenerate it "
                 f"(agent-guard generate crd --out {CRD_FILE.relative_to(ROOT)})")
        else:
            ok("AgentGuardPolicy CRD: generated", f"`{Path(binary).name} generate crd` writes the committed file")
    else:
        skipped("AgentGuardPolicy CRD: generated",
                "no built agent-guard binary; the unit test committed_crd_is_what_the_code_generates checks it")

    check = "AgentGuardPolicy sample: valid against the CRD"
    try:
        import jsonschema
        from importlib.metadata import version
    except ImportError:
        skipped(check, "jsonschema not installed", tool_missing=True)
        return
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    if sample.get("apiVersion") != f"{group}/{versions[0]['name']}" or sample.get("kind") != kind:
        fail(check, f"the sample is {sample.get('apiVersion')} {sample.get('kind')}, not {group}/{versions[0]['name']} {kind}")
        return
    validator = jsonschema.Draft4Validator(strict(schema))
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(sample)]
    if errors:
        fail(check, "; ".join(errors))
    else:
        ok(check, f"{SAMPLE_FILE.relative_to(ROOT)} (jsonschema {version('jsonschema')}, the CRD's openAPIV3Schema "
                  "with unknown fields refused, as kubectl's strict field validation does)")
    # The validator must refuse what the API server would.
    check = "AgentGuardPolicy schema: refuses bad objects"
    bad = {
        "a port as a string": lambda o: o["spec"]["tool"][0]["endpoints"][0].__setitem__("port", "18081"),
        "an unknown key": lambda o: o["spec"]["tenant"][0].__setitem__("colour", "red"),
        "an agent without tools": lambda o: o["spec"]["agent"][0].pop("tools"),
        "no spec": lambda o: o.pop("spec"),
    }
    let_through = []
    for what, mutate in bad.items():
        o = yaml.safe_load(SAMPLE_FILE.read_text())
        mutate(o)
        if validator.is_valid(o):
            let_through.append(what)
    if let_through:
        fail(check, f"accepted {', '.join(let_through)}")
    else:
        ok(check, f"refuses {', '.join(bad)}")

    skipped("AgentGuardPolicy: API server admission and a live watch",
            "no API server here; the CRD's structural rules and the sample are checked above, and the daemon's "
            "apply path against recorded watch events by `cargo xtask test` (daemon::kubernetes)")

    check = "AgentGuardPolicy sample: is policy.toml"
    try:
        policy = tomllib.loads((K8S / "policy.toml").read_text())
    except tomllib.TOMLDecodeError as e:
        fail(check, str(e))
        return
    if sample.get("spec") == policy:
        ok(check, "its spec is the ConfigMap's policy.toml, key for key (checked by `agent-guard policy check` below)")
    else:
        fail(check, "its spec differs from policy.toml; keep the two the same policy")


def policy_resource_component(kubectl: str | None) -> None:
    """The policy-resource component, used from an overlay as README.md says."""
    check = "kustomize component policy-resource"
    if not kubectl or not Path(kubectl).exists():
        skipped(check, "no kubectl (kustomize) here", tool_missing=True)
        return
    overlay = WORK / "overlay"
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../../../deploy/kubernetes]\ncomponents: [../../../deploy/kubernetes/policy-resource]\n")
    r = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True)
    if r.returncode != 0:
        fail(check, r.stderr.strip())
        return
    objs = [d for d in yaml.safe_load_all(r.stdout) if d]
    ds = one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"] if ds else {}
    args = pod.get("containers", [{}])[0].get("args", [])
    problems = []
    if "--policy-source=kubernetes" not in args or "--policy-object=default" not in args:
        problems.append(f"the daemon's args lack --policy-source=kubernetes --policy-object=default: {args}")
    if pod.get("automountServiceAccountToken") is not True:
        problems.append("the pod does not mount its ServiceAccount token")
    if problems:
        fail(check, "; ".join(problems))
        return
    ok(check, f"{len(objs)} objects; the DaemonSet follows AgentGuardPolicy/default with its token mounted")
    schema_validate(objs, "deploy/kubernetes + policy-resource")


def readme_checks(ds_objs: list[dict]) -> list[dict]:
    """The capability table of README.md says what the manifest grants, and
    the agent pod example is a valid Pod that launches with a token."""
    readme = (K8S / "README.md").read_text()
    check = "README.md: capability table"
    listed = set(re.findall(r"^\| `CAP_([A-Z_]+)`", readme, re.M))
    if listed == CAPABILITIES:
        ok(check, "lists exactly the capabilities the DaemonSet adds")
    else:
        fail(check, f"lists {sorted(listed)}, the DaemonSet adds {sorted(CAPABILITIES)}")

    check = "README.md: agent pod example"
    m = re.search(r"<!-- validate: agent-pod -->\s*```yaml\n(.*?)```", readme, re.S)
    if not m:
        fail(check, "no yaml block after <!-- validate: agent-pod -->")
        return []
    docs = [d for d in yaml.safe_load_all(m.group(1)) if d]
    pods = [d for d in docs if d.get("kind") == "Pod"]
    problems = []
    ds = one(ds_objs, "DaemonSet")
    args = daemon_args(ds["spec"]["template"]["spec"]["containers"][0]) if ds else {}
    if len(pods) != 1:
        problems.append("not exactly one Pod")
    else:
        pod = pods[0]["spec"]
        gid = int(args.get("control-group", "-1"))
        if gid not in pod.get("securityContext", {}).get("supplementalGroups", []):
            problems.append(f"the pod is not in the daemon's --control-group {gid}")
        if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append("the pod does not run as non-root (a root launcher in a pod cannot verify itself, and is root to the daemon)")
        hp = [v for v in pod.get("volumes", []) if v.get("hostPath", {}).get("path") == "/run/agent-guard"]
        if not hp:
            problems.append("the pod does not mount the host's /run/agent-guard")
        cmd = " ".join(sum((c.get("command", []) + c.get("args", []) for c in pod.get("containers", [])), []))
        if not re.search(r"agent-guard run --token \S+ --", cmd):
            problems.append("no container starts its agent with `agent-guard run --token FILE --`")
        if pod.get("restartPolicy") != "Never":
            problems.append("restartPolicy is not Never (a launch token is single-use)")
    if problems:
        fail(check, "; ".join(problems))
    else:
        ok(check, "one Pod: non-root, in the control group, mounts /run/agent-guard, launches with a token")
    return docs


def policy_check(binary: str | None) -> None:
    path = K8S / "policy.toml"
    try:
        tomllib.loads(path.read_text())
        ok("policy.toml: TOML", "parses")
    except tomllib.TOMLDecodeError as e:
        fail("policy.toml: TOML", str(e))
        return
    if not binary:
        skipped("policy.toml: agent-guard policy check", "no built agent-guard binary (cargo xtask build)")
        return
    r = subprocess.run([binary, "policy", "check", str(path)], capture_output=True, text=True)
    if r.returncode == 0:
        ok("policy.toml: agent-guard policy check", r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "ok")
    else:
        fail("policy.toml: agent-guard policy check", (r.stdout + r.stderr).strip())


def find_binary() -> str | None:
    env = os.environ.get("AGENT_GUARD_BIN")
    if env:
        return env if Path(env).is_file() else None
    found = [p for p in (ROOT / "target/debug/agent-guard", ROOT / "target/release/agent-guard") if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def emulate(binary: str | None, ds_objs: list[dict], pod_docs: list[dict]) -> None:
    """Runs the DaemonSet's container as this host would: see emulate-node.sh."""
    check = "node emulation"
    if os.geteuid() != 0:
        skipped(check, "needs root (namespaces, cgroups, eBPF)")
        return
    if not binary:
        skipped(check, "no built agent-guard binary (cargo xtask build)")
        return
    for tool in ("unshare", "nsenter", "setpriv", "stat"):
        if not shutil.which(tool):
            skipped(check, f"{tool} (util-linux/coreutils) not found")
            return
    ds = one(ds_objs, "DaemonSet")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    pod = next(d for d in pod_docs if d.get("kind") == "Pod")["spec"]
    work = WORK / "node"
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # The policy: the ConfigMap's, plus a launch-token key for the agent
    # pod (the shipped policy names no keys), and a call it refuses.
    policy_text = (K8S / "policy.toml").read_text()
    policy = tomllib.loads(policy_text)
    agent = (policy.get("agent") or [None])[0]
    if not agent:
        skipped(check, "policy.toml names no agent to launch")
        return
    deny = None
    for tool in policy.get("tool", []):
        if tool["name"] in agent.get("tools", []):
            continue
        for ep in tool.get("endpoints", []):
            if "cidr" in ep and "." in ep["cidr"] and ep.get("proto", "tcp") == "tcp":
                deny = (ep["cidr"].split("/")[0], ep["port"])
                break
        if deny:
            break
    if not deny:
        skipped(check, "policy.toml has no IPv4 TCP endpoint the agent may not reach")
        return
    key = subprocess.run([binary, "token", "keygen", "--out", str(work / "issuer.key")],
                         capture_output=True, text=True)
    if key.returncode != 0:
        fail(check, f"token keygen: {key.stderr.strip()}")
        return
    lines, in_tenant, done = [], False, False
    for line in policy_text.splitlines():
        lines.append(line)
        if line.strip() == "[[tenant]]":
            in_tenant = True
        elif line.startswith("["):
            in_tenant = False
        elif in_tenant and not done and line.replace(" ", "") == f'name="{agent["tenant"]}"':
            lines.append(f'token_keys = ["{key.stdout.strip()}"]')
            done = True

    # Volumes other than /sys ones live under WORK; the args follow them.
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mapped = {}
    for m in c["volumeMounts"]:
        if m["mountPath"].startswith("/sys/"):
            continue
        stand_in = work / f"vol-{m['name']}"
        stand_in.mkdir(mode=0o755)
        mapped[m["mountPath"].rstrip("/")] = str(stand_in)
        if "configMap" in vols[m["name"]]:
            (stand_in / "policy.toml").write_text("\n".join(lines) + "\n")
    args = []
    for a in c["args"]:
        a = a.replace("$(NODE_NAME)", "emulated-node")
        if a.startswith("--") and "=" in a:
            flag, value = a.split("=", 1)
            for mp, stand_in in mapped.items():
                if value == mp or value.startswith(mp + "/"):
                    value = stand_in + value[len(mp):]
            a = f"{flag}={value}"
        args.append(a)
    # The container's command script and args exactly as the manifest has
    # them, with $(NODE_NAME) expanded as the kubelet would.
    (work / "command.sh").write_text(c["command"][2])
    (work / "args").write_text("\n".join(args) + "\n")
    (work / "caps").write_text(",".join(sorted(c["securityContext"]["capabilities"]["add"])) + "\n")
    (work / "pod-uid").write_text(f"{pod['securityContext']['runAsUser']}\n")
    (work / "pod-groups").write_text(",".join(str(g) for g in pod["securityContext"]["supplementalGroups"]) + "\n")
    (work / "agent").write_text(f"{agent['tenant']} {agent['name']}\n")
    (work / "deny").write_text(f"{deny[0]} {deny[1]}\n")
    r = subprocess.run(["bash", str(K8S / "emulate-node.sh"), str(work), binary],
                       text=True, capture_output=True)
    sys.stdout.write(r.stdout)
    for line in r.stdout.splitlines():
        if line.startswith("ok "):
            counts["ok"] += 1
        elif line.startswith("SKIPPED "):
            counts["skipped"] += 1
        elif line.startswith("FAIL "):
            failures.append(line.split(":")[0][len("FAIL"):].strip() or "node emulation")
    if r.returncode != 0 and not any(line.startswith("FAIL ") for line in r.stdout.splitlines()):
        fail(check, f"emulate-node.sh exited {r.returncode}; its log: {work}/emulate.log\n"
                    + "\n".join(r.stderr.strip().splitlines()[-15:]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubectl")
    ap.add_argument("--hadolint")
    ap.add_argument("--emulate", action="store_true")
    opts = ap.parse_args()

    check_containerfile(opts.hadolint)

    base = kustomization_structure(K8S)
    mon = kustomization_structure(K8S / "monitoring")
    built = kustomize_build(opts.kubectl, K8S)
    built_mon = kustomize_build(opts.kubectl, K8S / "monitoring")
    objs = built if built is not None else base
    mobjs = built_mon if built_mon is not None else mon
    if objs is None or mobjs is None:
        print(f"\nvalidate: {counts['ok']} passed, {len(failures)} failed, {counts['skipped']} skipped")
        return 1
    if built is not None and base is not None:
        # kustomize applied what the structural check assumed.
        cm = one(built, "ConfigMap")
        if not cm or cm["metadata"]["name"] != "agent-guard-policy" or \
                cm["data"].get("policy.toml") != (K8S / "policy.toml").read_text():
            fail("kustomize build: ConfigMap", "agent-guard-policy does not carry policy.toml verbatim (or got a hash suffix)")
        else:
            ok("kustomize build: ConfigMap", "agent-guard-policy carries policy.toml verbatim, no hash suffix")
    schema_validate(objs, "deploy/kubernetes")
    servicemonitor_validate(mobjs)
    semantic_checks(objs, mobjs)
    rbac_checks(objs)
    crd_checks(objs, find_binary())
    policy_resource_component(opts.kubectl)
    pod_docs = readme_checks(objs)
    if pod_docs:
        schema_validate(pod_docs, "README.md agent pod example")
    binary = find_binary()
    policy_check(binary)
    if opts.emulate:
        if pod_docs:
            emulate(binary, objs, pod_docs)
        else:
            skipped("node emulation", "the README's agent pod example did not parse")

    print()
    if failures:
        print(f"validate: failed: {', '.join(dict.fromkeys(failures))}")
    print(f"validate: {counts['ok']} passed, {len(failures)} failed, {counts['skipped']} skipped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
