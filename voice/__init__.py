"""splitrelay.voice: an offline voice agent (and a Pipecat adapter) behind the transceiver's handler interface."""
