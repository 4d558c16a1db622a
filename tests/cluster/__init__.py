"""The local Kubernetes test bed: a real control plane built from Go modules, kwok's
simulated GPU nodes, and a process node that really runs pods. Test infrastructure:
nothing outside tests/ imports it."""
