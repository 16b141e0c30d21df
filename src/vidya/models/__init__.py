"""Model code (Llama family, flat batches) and weight loading."""
