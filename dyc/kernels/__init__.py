"""Native kernels of dyc (CUDA, built by the top-level CMakeLists.txt) and their PyTorch references."""
