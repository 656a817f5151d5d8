"""The closed loop: online A/B tests of rankers in the interactive world (``lifelong abtest``).

A room of its own, next to ``transact``, ``dv365`` and ``monolith`` and independent of them: it
reaches rankers over HTTP only. ``policies`` parses the arms and calls the services,
``metrics`` computes the online metrics with bootstrap intervals, ``abtest`` runs the test and
writes the report. See docs/abtest.md.
"""
