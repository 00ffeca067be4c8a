"""Running jobs on a cluster: joining Ray (`runtime`), submitting (`submit`), scheduling (`schedule`) and
the input ledger (`ledger`).
"""
