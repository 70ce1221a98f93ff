"""Linear-layer plugins: `bf16` (dense weights, today's path with the GEMV kernels) and
`w4a16` (4-bit weights from GPTQ, AWQ, compressed-tensors and GGUF checkpoints)."""
