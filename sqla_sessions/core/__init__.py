"""The core: a session as a mapping, what a save sends (the unit of work), the three-way merge, and
how a payload is stored (tagged JSON, sealing). No I/O here, and nothing from the layers above."""
