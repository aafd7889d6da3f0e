#!/usr/bin/env bash
# Validates the deployment artefacts under deploy/, without a cluster and without network
# access beyond PyPI (first run only):
#   1. every Kubernetes manifest under deploy/k8s (and the GPU overlay, rendered by applying its
#      JSON 6902 patch) against the JSON schemas of Kubernetes $K8S_VERSION (default 1.33.0),
#      strictly (unknown fields are errors), with kubernetes-validate, which bundles the
#      schemas; an unknown kind or apiVersion is an error too;
#   2. that deploy/k8s/kustomization.yaml lists every manifest of its folder and nothing else;
#   3. what the schemas cannot see: every veil-server flag used (StatefulSet args, the
#      Containerfiles' CMD, deploy/local-cluster.sh) exists in server/src/main.rs, the preStop
#      sleep equals --drain-ms, terminationGracePeriodSeconds exceeds drain + --shutdown-grace,
#      HAProxy marks a draining replica down before its drain ends, the HPA's maxReplicas has a
#      `server` line in the front's config, and the memory limit covers the README's bound for
#      the flags;
#   4. `haproxy -c` on deploy/haproxy.cfg and on the front's config from
#      deploy/k8s/haproxy-front-configmap.yaml (with a throwaway certificate), when haproxy is
#      installed (VALIDATE_DEPLOY_REQUIRE_HAPROXY=1 makes its absence an error).
# Exits non-zero on the first class of failure found, after reporting every failure of it.
#
# Usage: scripts/validate-deploy.sh            (K8S_VERSION=1.35.0 scripts/validate-deploy.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-1.33.0}
VENV=${VALIDATE_DEPLOY_VENV:-.venv/validate-deploy}
# kubernetes-validate 1.37.0 bundles the schemas of Kubernetes 1.25 to 1.37. All pinned, so
# that a new release of a dependency cannot change what passes.
REQUIREMENTS="kubernetes-validate==1.37.0 PyYAML==6.0.4 jsonschema==4.26.0
jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0
importlib_resources==7.1.0 packaging==26.4 typing_extensions==4.16.0"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]; then
  echo "validate-deploy: installing kubernetes-validate into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --disable-pip-version-check $REQUIREMENTS
  printf '%s' "$REQUIREMENTS" > "$VENV/.requirements"
fi

"$VENV/bin/python" - "$K8S_VERSION" <<'PY'
import copy, glob, json, os, re, sys
import yaml
import kubernetes_validate as kv

version = sys.argv[1]
failures = []
def fail(msg):
    failures.append(msg)
    print("FAIL " + msg)

def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

# --- 1. schemas ---------------------------------------------------------------------------
def validate(label, doc):
    name = "%s/%s" % (doc.get("kind", "?"), doc.get("metadata", {}).get("name", "?"))
    try:
        kv.validate(doc, version, strict=True)
        print("ok   %s %s (Kubernetes %s, strict)" % (label, name, version))
    except kv.ValidationError as e:
        fail("%s %s: %s: %s" % (label, name, ".".join(str(p) for p in e.path) or "(root)", e.message))
    except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
        fail("%s %s: no schema for kind %s, apiVersion %s in Kubernetes %s"
             % (label, name, doc.get("kind"), doc.get("apiVersion"), version))

NOT_RESOURCES = ("kustomization.yaml",)
manifests = sorted(p for p in glob.glob("deploy/k8s/**/*.yaml", recursive=True)
                   if os.path.basename(p) not in NOT_RESOURCES and not p.endswith(".patch.yaml"))
if not manifests:
    fail("no manifests under deploy/k8s")
resources = {}
for path in manifests:
    for d in docs(path):
        validate(path, d)
        resources[(d.get("kind"), d.get("metadata", {}).get("name"))] = d

# The GPU overlay: its JSON 6902 patch applied to the StatefulSet, as kustomize would.
def pointer(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
def apply_patch(doc, ops):
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = pointer(op["path"])
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if op["op"] in ("add", "replace"):
            if isinstance(node, list):
                if last == "-":
                    node.append(op["value"])
                elif op["op"] == "add":
                    node.insert(int(last), op["value"])
                else:
                    node[int(last)] = op["value"]
            else:
                if op["op"] == "replace" and last not in node:
                    raise KeyError("replace of a missing member: " + op["path"])
                node[last] = op["value"]
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise ValueError("unsupported op " + op["op"])
    return doc
for kpath in sorted(glob.glob("deploy/k8s/*/kustomization.yaml")):
    k = docs(kpath)[0]
    base_dir = os.path.dirname(kpath)
    for patch in k.get("patches", []):
        t = patch["target"]
        target = resources.get((t["kind"], t["name"]))
        if target is None:
            fail("%s: patch target %s/%s not found" % (kpath, t["kind"], t["name"]))
            continue
        try:
            rendered = apply_patch(target, docs(os.path.join(base_dir, patch["path"]))[0])
        except (KeyError, IndexError, ValueError, TypeError) as e:
            fail("%s: patch %s does not apply: %s" % (kpath, patch["path"], e))
            continue
        validate("%s (rendered)" % kpath, rendered)

# --- 2. the kustomization lists every manifest of its folder -------------------------------
k = docs("deploy/k8s/kustomization.yaml")[0]
listed = set(k.get("resources", []))
present = set(os.path.basename(p) for p in glob.glob("deploy/k8s/*.yaml")) - set(NOT_RESOURCES)
for f in sorted(present - listed):
    fail("deploy/k8s/kustomization.yaml does not list %s" % f)
for f in sorted(listed - present):
    fail("deploy/k8s/kustomization.yaml lists %s, which does not exist" % f)

# --- 3. what the schemas cannot see ----------------------------------------------------------
main_rs = open("server/src/main.rs").read()
known = set()
for m in re.finditer(r"#\[arg\(([^\]]*)\)\]\s*(?:///[^\n]*\n\s*|#\[[^\n]*\n\s*)*(\w+):", main_rs):
    if "long" in m.group(1):
        known.add(m.group(2).replace("_", "-"))
# Flags of work in progress elsewhere, documented in deploy/SCALING.md: a warning until
# server/src/main.rs has them.
PLANNED = set()
def check_flags(where, args):
    for a in args:
        if not a.startswith("--"):
            continue
        flag = a[2:].split("=", 1)[0]
        if flag in known:
            continue
        if flag in PLANNED:
            print("warn %s: --%s is not in server/src/main.rs yet (planned)" % (where, flag))
        else:
            fail("%s: --%s is not a veil-server flag (server/src/main.rs)" % (where, flag))
if len(known) < 10:
    fail("could not read the flags of server/src/main.rs (found %d)" % len(known))

sts = resources.get(("StatefulSet", "veil-server"))
if sts is None:
    fail("no StatefulSet veil-server")
    sts_args = {}
else:
    pod = sts["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "veil-server")
    check_flags("StatefulSet veil-server", c["args"])
    sts_args = dict(a[2:].split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)
for cf in ("deploy/Containerfile", "deploy/Containerfile.gpu"):
    text = open(cf).read().replace("\\\n", " ")
    m = re.search(r"^CMD (\[.*\])\s*$", text, re.M)
    if not m:
        fail("%s: no CMD [...] line" % cf)
    else:
        check_flags(cf + " CMD", json.loads(m.group(1)))
# deploy/local-cluster.sh: the flags between its `# >>> veil-server args` markers.
m = re.search(r"# >>> veil-server args\n(.*?)# <<< veil-server args", open("deploy/local-cluster.sh").read(), re.S)
if not m:
    fail("deploy/local-cluster.sh: no `# >>> veil-server args` ... `# <<< veil-server args` block")
else:
    check_flags("deploy/local-cluster.sh", re.findall(r"(--[a-z][a-z-]+)", m.group(1)))

def num(name, default):
    return float(sts_args.get(name, default))
# Defaults of server/src/main.rs where the StatefulSet does not set a flag.
drain_s = num("drain-ms", 0) / 1000
grace_s = num("shutdown-grace", 30)
if sts is not None:
    pre = c.get("lifecycle", {}).get("preStop", {})
    cmd = " ".join(pre.get("exec", {}).get("command", []))
    m = re.search(r"sleep (\d+)", cmd)
    pre_s = float(m.group(1)) if m else float(pre.get("sleep", {}).get("seconds", 0))
    if drain_s <= 0:
        fail("StatefulSet: --drain-ms is not set (behind a balancer it must be)")
    if pre_s != drain_s:
        fail("StatefulSet: preStop waits %gs but --drain-ms is %gs" % (pre_s, drain_s))
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if not tgps > drain_s + grace_s:
        fail("StatefulSet: terminationGracePeriodSeconds %s <= drain %gs + --shutdown-grace %gs"
             % (tgps, drain_s, grace_s))
    else:
        print("ok   shutdown: preStop %gs = --drain-ms; terminationGracePeriodSeconds %s > %gs + %gs"
              % (pre_s, tgps, drain_s, grace_s))

    # Memory: README's bound, (key-cache + concurrent-inferences + 2 x (concurrent-uploads + 1))
    # expanded keys of ~120 MB, plus the evaluations' working memory and the queued messages.
    kc, ci, cu = num("key-cache", 4), num("concurrent-inferences", 2), num("concurrent-uploads", 2)
    mib = 1 << 20
    bound = (kc + ci + 2 * (cu + 1)) * 120e6 + ci * num("max-merged-mib", 4096) * mib \
        + num("max-queue", 64) * 16 * mib
    lim = c["resources"]["limits"]["memory"]
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+)([KMG]i?)?", lim)
    lim_b = int(m.group(1)) * units.get(m.group(2) or "", 1)
    if lim_b < bound:
        fail("StatefulSet: memory limit %s < %.0f MiB, the bound its flags imply" % (lim, bound / mib))
    else:
        print("ok   memory: limit %s >= %.0f MiB bound for key-cache %g, %g inferences, %g uploads"
              % (lim, bound / mib, kc, ci, cu))

# HAProxy configs: down before the drain ends; every replica the HPA may create has a line.
def haproxy_timing(where, cfg):
    inter = re.search(r"default-server .*?\binter (\d+)s", cfg)
    fall = re.search(r"default-server .*?\bfall (\d+)", cfg)
    tchk = re.search(r"timeout check (\d+)s", cfg)
    if not (inter and fall and tchk):
        fail("%s: cannot read inter / fall / timeout check" % where)
        return
    worst = int(fall.group(1)) * (int(inter.group(1)) + int(tchk.group(1)))
    if drain_s and worst >= drain_s:
        fail("%s: a draining replica is marked down after up to %ds, not before --drain-ms %gs"
             % (where, worst, drain_s))
    else:
        print("ok   %s: draining replica down within %ds < --drain-ms %gs" % (where, worst, drain_s))
haproxy_timing("deploy/haproxy.cfg", open("deploy/haproxy.cfg").read())
front = resources.get(("ConfigMap", "haproxy-front"))
hpa = resources.get(("HorizontalPodAutoscaler", "veil-server"))
if front is None or hpa is None:
    fail("no ConfigMap haproxy-front or no HPA veil-server")
else:
    cfg = front["data"]["haproxy.cfg"]
    haproxy_timing("ConfigMap haproxy-front", cfg)
    svc = sts["spec"]["serviceName"] if sts else "?"
    ns = sts["metadata"].get("namespace", "veil") if sts else "?"
    names = re.findall(r"^\s*server \S+ ([\w.-]+):50051", cfg, re.M)
    want = ["veil-server-%d.%s.%s.svc.cluster.local" % (i, svc, ns)
            for i in range(hpa["spec"]["maxReplicas"])]
    if names[:len(want)] != want:
        fail("ConfigMap haproxy-front: server lines %s do not cover the HPA's %d replicas %s"
             % (names, hpa["spec"]["maxReplicas"], want))
    else:
        print("ok   ConfigMap haproxy-front: a server line for each of the HPA's %d replicas" % len(want))
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("StatefulSet", "veil-server"):
        fail("HPA targets %s/%s, not the StatefulSet veil-server" % (ref["kind"], ref["name"]))

if failures:
    print("validate-deploy: %d manifest check(s) failed" % len(failures))
    sys.exit(1)
print("validate-deploy: manifests ok")
PY

# --- 4. haproxy -c ---------------------------------------------------------------------------
if command -v haproxy >/dev/null; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  haproxy -v | sed -n 1p
  if ! haproxy -c -f deploy/haproxy.cfg; then
    echo "FAIL haproxy -c deploy/haproxy.cfg" >&2
    exit 1
  fi
  echo "ok   haproxy -c deploy/haproxy.cfg"
  # The front's config, with its certificate path pointed at a throwaway self-signed pair.
  "$VENV/bin/python" -c '
import sys, yaml
d = next(d for d in yaml.safe_load_all(open("deploy/k8s/haproxy-front-configmap.yaml")) if d)
sys.stdout.write(d["data"]["haproxy.cfg"].replace("/etc/haproxy/tls/", sys.argv[1] + "/"))' "$tmp" > "$tmp/front.cfg"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=validate-deploy \
    -keyout "$tmp/veil.pem.key" -out "$tmp/veil.pem" 2>/dev/null
  if ! haproxy -c -f "$tmp/front.cfg"; then
    echo "FAIL haproxy -c of the config in deploy/k8s/haproxy-front-configmap.yaml" >&2
    exit 1
  fi
  echo "ok   haproxy -c (the config in deploy/k8s/haproxy-front-configmap.yaml)"
elif [ "${VALIDATE_DEPLOY_REQUIRE_HAPROXY:-0}" = 1 ]; then
  echo "FAIL haproxy is not installed (apt-get install haproxy)" >&2
  exit 1
else
  echo "skip haproxy -c: haproxy is not installed (apt-get install haproxy)"
fi
echo "validate-deploy: all checks passed"
