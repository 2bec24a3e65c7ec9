# Pinned versions of everything the e2e control plane is built from.
# Bump them together: kube-apiserver and kubectl come from one Kubernetes release,
# its staging modules are the published k8s.io/* modules of the same release.
# shellcheck shell=bash disable=SC2034 # read by the scripts that source lib/common.sh
KUBE_VERSION=v1.36.3
KUBE_STAGING_VERSION=v0.36.3
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.20.2
