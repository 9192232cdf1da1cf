"""Studies that answer one question with a recorded run (results/<run>/), run from the
repository root as `python -m experiments.<study>.run`.

quality: training recipes x samplers at an equal budget, scored against the design's sampler.
"""
