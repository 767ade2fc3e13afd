"""Serving: the tritonserver launcher (launcher.py, `python -m pixelrnn.server`) and deployment
manifests (deploy/). A model repository is written by server/repository.py and executes only
the torch-free runtime/ copied into it."""
