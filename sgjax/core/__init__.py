"""The pure core: layers, synthesizers, methods, the ``Trainer``, optimizers; no flags, no I/O."""
