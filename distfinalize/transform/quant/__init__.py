"""--quantize: recipe types (base), the recipes (compressed, torchao), their registry (recipes) and which weights
are quantized (selection).
"""
