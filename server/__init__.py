"""Triton deployment: the model repository writer (repository.py), the model glue
(triton_models/), the cross-sequence sampling engine (engine.py, runner.py), the request
protocol (protocol.py) and the tritonserver launcher (launcher.py, `python -m server`)."""
