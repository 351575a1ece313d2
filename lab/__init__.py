"""splitrelay.lab: a relay network on one machine, built from network namespaces and veths.

A tool for tests, the bench, the demo and ``splitrelay lab``; the edge agent and the
transceiver never import it.
"""
