"""splitrelay.wire: the byte layouts the relay and the transceiver share (STUN, routing hint, byte order).

Pure Python, no I/O: the edge's userspace relay and reference parser and the
transceiver's ICE seam import the same definitions.
"""
