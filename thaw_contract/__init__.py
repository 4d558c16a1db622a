"""The contract between the trainer and the operator: the FineTuneJob spec (one pydantic model
that the trainer runs, the CRD schema is generated from and every spec error comes from), the
architecture catalog, stage planning and each architecture's layer table.

Both sides import it; it imports neither of them, nor torch, nor the Kubernetes client (the
operator image carries no torch, the trainer image no Kubernetes client). import-linter's
contracts in pyproject.toml check this in `make lint` and tests/unit/test_import_contracts.py.
"""
