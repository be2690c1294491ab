"""What every package of the testbed stands on: units and the config base.

``core`` imports nothing of ``nodes``, ``fabric`` or ``testbed``; they import it.
"""
