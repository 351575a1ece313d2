"""splitrelay: an XDP edge relay in front of stateful WebRTC transceivers for voice AI.

The root package holds only what every part shares: the exception base
(``splitrelay.errors``).  Each part is a package of its own; docs/DESIGN.md maps them.
"""
