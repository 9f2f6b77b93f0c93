"""The GPT model (gpt.py) and its shape (shape.py, no torch): no parallel, rank or config logic here."""
