"""WHIP's (RFC 9725) names that the endpoint (transceiver/whip.py) and its clients (client/) share.

The session resource in ``Location`` is a secret capability; the session's public id, which the
transceiver's logs, metrics and admin listener use, reaches its caller in its own header so that a
caller can quote it (support, tests) without its resource ever being shown.
"""

SESSION_ID = "X-Splitrelay-Session"   # the public id of the session a 201 created; it opens nothing
