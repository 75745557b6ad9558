"""PTL15x: the router / gate contract."""
