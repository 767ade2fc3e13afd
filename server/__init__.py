"""Serving: the tritonserver launcher (launcher.py, `python -m server`) and deployment
manifests (deploy/). A model repository is written by export/repository.py and executes only
the torch-free runtime/ copied into it."""
