"""Triton Python-backend model templates, copied as model.py by server/repository.py."""
