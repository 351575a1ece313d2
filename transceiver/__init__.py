"""splitrelay.transceiver."""
