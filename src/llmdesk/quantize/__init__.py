"""Quantization (llama.cpp's quantizer), importance matrices, and the size-quality sweep.

    from llmdesk.quantize.core import quantize_file, QUANT_TYPES
    from llmdesk.quantize.imatrix import compute_imatrix, load_imatrix, save_imatrix
    from llmdesk.quantize.sweep import sweep
"""
