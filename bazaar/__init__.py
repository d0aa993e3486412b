"""The ``bazaar`` command and the single-machine mode: the composition root.

Nothing imports this package; it imports every other. ``cli`` parses the command line and
starts one process or tool; ``local`` is ``bazaar serve``'s endpoint source, model workers
kept by the ``supervisor`` and scaled by the autoscaler's loop through the local ``scaler``.
"""
