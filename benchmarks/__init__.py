"""Side-by-side performance scripts: ppl_vae against hand-written PyTorch (see RESULTS.md)."""
