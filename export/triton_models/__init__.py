"""Triton Python-backend model templates, copied as model.py by export/repository.py."""
