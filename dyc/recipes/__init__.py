"""Training recipes: a small pixel-space DiT on scikit-learn's digits and its DiT -> DyDiT fine-tuning.

``python -m dyc.recipes.run_all`` reruns the whole recipe that produced ``dyc/models/*.safetensors``.
"""
