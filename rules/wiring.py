"""PTL206, PTL4xx: wiring the model into the framework and its test harness (cross-file)."""
