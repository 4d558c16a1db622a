"""The Thaw operator (kopf): plans one Indexed Job per stage from the same spec models the
trainer uses (`thaw_contract.spec`). Named thaw_operator so it never shadows the standard
library's `operator` module."""
