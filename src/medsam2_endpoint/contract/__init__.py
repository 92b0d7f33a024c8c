"""Request contracts of every route (pydantic models only: no torch, no numpy work) and their validation messages."""
