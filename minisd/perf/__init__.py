"""Appendix: speed and memory, applied from outside the chapters. CUDA graphs (`graphs.py`: record a call's kernels
once and replay them; graphed sampling and training steps), torch.compile of the UNet's blocks and the VAE encoder
(`compile.py`), gradient checkpointing (`checkpoint.py`), VAE slicing and tiling (`vae_memory.py`), the per-stage
step profiler (`profiler.py`) and an 8-bit (int8 / fp8) frozen base dequantised in each forward (`quant.py`). A
chapter reads as the plain algorithm and never imports from here; each file here imports only chapters and says in
its docstring what it changes: nothing, the rounding order, or an approximation.
"""
