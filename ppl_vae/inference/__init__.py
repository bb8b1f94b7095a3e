"""Inference: the one implementation of the log importance weights and everything built on it.

- :mod:`~ppl_vae.inference.weights`: per-datum log weights (and their summed form), the
  particle plate, the per-site densities;
- :mod:`~ppl_vae.inference.estimators`: the ELBO classes (lean Trace_ELBO, IWAE/Rényi/DReG,
  STL, TraceGraph as a module);
- :mod:`~ppl_vae.inference.objectives`: ``ObjectiveConfig`` and the one objective table;
- :mod:`~ppl_vae.inference.recording`: recorded and replayed programs (a fast path that refuses
  whenever it could differ from the program);
- :mod:`~ppl_vae.inference.svi`: the one SVI loop;
- :mod:`~ppl_vae.inference.gradients`: gradient noise and estimator comparisons;
- :mod:`~ppl_vae.inference.kl`: the Gaussian KL in closed form and by Monte Carlo.
"""
