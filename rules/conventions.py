"""PTL504, PTL506: conventions checked within one file."""
