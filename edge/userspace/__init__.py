"""The userspace data plane: ``plane`` (the ``DataPlane`` and its tables) and ``relay`` (the sockets)."""
