"""splitrelay.client: a standard WebRTC caller (aiortc over WHIP) that probes and measures a relay."""
