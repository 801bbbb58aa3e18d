"""Tandem's Kubernetes operator: `ModelDeployment` (tandem.dev/v1alpha1) -> workloads on GPU nodes.

Layout: `api` (typed models, the CRD's source), `crd` (CRD generator), `validation` (checks the
schema cannot express), `builders` and `placement` (pure child builders), `patching` (what to
write), `status` (conditions and replica counts), `k8s` (API calls), `reconciler` (one pass),
`handlers` (Kopf wiring), `main` (`tandem operator`).
"""

__version__ = "0.1.0"
