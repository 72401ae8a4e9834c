"""Reference peers that stand in for CNSS and the national shared record (`gateway sandbox`).

No public CNSS or shared-record interface exists, so the contract is ours; these peers are
its executable definition, used by `make run` and the tests.
"""
