"""FP8-dynamic quantization (`make`, run in the quantize environment) and the check of its output (`verify`).
"""
