"""PTL501, PTL502, PTL503, PTL505: conventions checked against Hugging Face's
implementation and the project's example configs."""
