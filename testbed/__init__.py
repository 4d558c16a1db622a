"""The local test bed, a product of its own: a real Kubernetes control plane built from Go
modules (etcd, kube-apiserver, controller-manager, scheduler), kwok's simulated GPU nodes, a
process node that really runs pods (node_agent), Kueue, real SeaweedFS and Prometheus servers
on loopback, and the operator as a process (operator_process).

Tests, benchmarks, `make demo`, `make cluster-up` and `make chaos` import it; it imports
nothing from tests/ (import-linter, pyproject.toml) and nothing here ships in an image.
"""
