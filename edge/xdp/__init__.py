"""The XDP data plane: ``plane`` (the ``DataPlane``), ``maps`` (its tables in the kernel), ``loader``
(compile, pin, attach), ``codec`` (records to map values), ``ports`` (translation's port pool)."""
