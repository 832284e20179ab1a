#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, kwok, helm) from the Go module proxy into a cache outside the repo, plus Volcano's
# PodGroup CRD (crds/volcano-podgroups.yaml beside bin/) for tests that apply it.
#
# Why from source: the machines have no container engine and reach only package registries, so
# the binaries come from Go modules pinned by the go.mod/go.sum files beside this script.
#
# The cache dir is keyed by the versions plus a hash of the module files, and a stamp file is
# written last, so a second run builds nothing. Progress goes to stderr; the last line on stdout
# is the bin dir (callers such as `make cluster-bins` and localcluster.py read it).
#
# Environment: DSOP_CLUSTER_CACHE (default ~/.cache/dsop-cluster), GOMODCACHE/GOCACHE (default
# ~/.cache/go-mod and ~/.cache/go-build), DSOP_CLUSTER_FORCE=1 to rebuild.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "build.sh: $*" >&2; }

# modver GO_MOD MODULE: the version MODULE is required at in GO_MOD.
modver() {
  awk -v m="$2" '
    $1 == "require" && $2 == m { print $3; exit }
    $1 == m && $2 ~ /^v[0-9]/ { print $2; exit }
  ' "$1"
}

k8s_version="$(modver "$here/kube/go.mod" k8s.io/kubernetes)"
etcd_version="$(modver "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)"
kwok_version="$(modver "$here/kwok/go.mod" sigs.k8s.io/kwok)"
helm_version="$(modver "$here/helm/go.mod" helm.sh/helm/v3)"
volcano_apis_version="$(modver "$here/volcano/go.mod" volcano.sh/apis)"
for v in k8s_version etcd_version kwok_version helm_version volcano_apis_version; do
  if [[ -z "${!v}" ]]; then
    log "could not read $v from the go.mod files in $here"
    exit 1
  fi
done

# The hash covers everything that shapes the binaries, so editing a go.mod or this script
# lands in a fresh cache dir instead of silently reusing stale binaries.
inputs_hash="$(
  cd "$here" &&
    cat build.sh kube/go.mod kube/go.sum etcd/go.mod etcd/go.sum etcd/main.go \
      kwok/go.mod kwok/go.sum helm/go.mod helm/go.sum \
      volcano/go.mod volcano/go.sum volcano/crd.go | sha256sum | cut -c1-12
)"
key="k8s-${k8s_version}_etcd-${etcd_version}_kwok-${kwok_version}_helm-${helm_version}"
key+="_volcano-${volcano_apis_version}_${inputs_hash}"
cache_root="${DSOP_CLUSTER_CACHE:-$HOME/.cache/dsop-cluster}"
out="$cache_root/$key"
bin="$out/bin"
stamp="$out/.complete"

mkdir -p "$out"
# Two callers (pytest and scripts/cluster, or two CI steps) must not build into one dir at once.
exec 9>"$out/.lock"
flock 9

if [[ -f "$stamp" && "${DSOP_CLUSTER_FORCE:-0}" != 1 ]]; then
  log "cached binaries found in $bin (built $(cat "$stamp")); nothing to build"
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || {
  log "go is not on PATH; install Go >= 1.25 to build the test cluster"
  exit 1
}

# -buildvcs=false: the etcd wrapper is built inside this git checkout, and stamping VCS data
# fails in CI clones owned by another user; the binaries carry their versions via -ldflags.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"
export GOMODCACHE="${GOMODCACHE:-$HOME/.cache/go-mod}"
export GOCACHE="${GOCACHE:-$HOME/.cache/go-build}"
# One job per core keeps memory in check on the 2-core, 24 GiB machines.
export GOMAXPROCS="${GOMAXPROCS:-$(nproc)}"

rm -rf "$bin" "$stamp" "$out/crds"
mkdir -p "$bin"
start=$SECONDS

k8s_minor="$(echo "$k8s_version" | cut -d. -f2)"
k8s_ldflags="-s -w"
# Without these stamps the binaries report v0.0.0 and Helm's kubeVersion checks fail.
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor"
  k8s_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$k8s_minor"
done

# build DIR LDFLAGS PACKAGES...: one go build per module so the packages share compilation.
build() {
  local dir="$1" ldflags="$2"
  shift 2
  log "building $* (in $dir)"
  (cd "$here/$dir" && go build -trimpath -ldflags="$ldflags" -o "$bin/" "$@")
}

# The etcd wrapper's binary takes the last element of its module path: "etcd".
build etcd "-s -w" .
build kube "$k8s_ldflags" tool
build kwok "-s -w" tool
build helm "$helm_ldflags" tool

for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm; do
  [[ -x "$bin/$b" ]] || {
    log "missing $bin/$b after the build"
    exit 1
  }
done

# Volcano's PodGroup CRD (scheduling.volcano.sh/v1beta1), rendered from the published API types
# (volcano.sh/apis) by the controller-gen version and options Volcano's Makefile pins for the
# release. The proxy refuses volcano.sh/volcano, which holds the YAML itself, so the render is
# checked byte for byte against the sha256 of that file at the same tag
# (config/crd/volcano/bases/scheduling.volcano.sh_podgroups.yaml; recorded with its source in
# tests/data/formats/volcano_podgroup.source.json).
volcano_podgroup_sha256=c30e6eea145258a207c310fdcf1cbcdfafc48031c74413e361381b2d19eee01f
log "fetching volcano.sh/apis@$volcano_apis_version and rendering the PodGroup CRD"
(cd "$here/volcano" && go mod download -json "volcano.sh/apis@$volcano_apis_version" >/dev/null)
(cd "$here/volcano" && go build -trimpath -o "$out/tools/" tool)
crd_tmp="$(mktemp -d)"
trap 'rm -rf "$crd_tmp"' EXIT
(cd "$here/volcano" && "$out/tools/controller-gen" \
  "crd:crdVersions=v1,generateEmbeddedObjectMeta=true" \
  paths=volcano.sh/apis/pkg/apis/scheduling/v1beta1 \
  "output:crd:artifacts:config=$crd_tmp")
got="$(sha256sum "$crd_tmp/scheduling.volcano.sh_podgroups.yaml" | cut -d' ' -f1)"
if [[ "$got" != "$volcano_podgroup_sha256" ]]; then
  log "rendered PodGroup CRD has sha256 $got, expected $volcano_podgroup_sha256"
  exit 1
fi
mkdir -p "$out/crds"
mv "$crd_tmp/scheduling.volcano.sh_podgroups.yaml" "$out/crds/volcano-podgroups.yaml"

cat >"$out/versions.env" <<EOF
K8S_VERSION=$k8s_version
ETCD_VERSION=$etcd_version
KWOK_VERSION=$kwok_version
HELM_VERSION=$helm_version
VOLCANO_APIS_VERSION=$volcano_apis_version
GO_VERSION=$(go env GOVERSION)
EOF
date -u +%Y-%m-%dT%H:%M:%SZ >"$stamp"
log "built in $((SECONDS - start))s into $bin"
echo "$bin"
