"""ul_model: the Unified Latents method (encoder, prior, decoder, base model). Knows nothing of suites or reports.

The implementation lands with issue 3; this package exists now so that the two-package layout is fixed.
"""
