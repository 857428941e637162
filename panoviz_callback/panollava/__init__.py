"""PanoLLaVA compatibility: its checkpoint layouts, configs, resamplers and view conventions.

Everything specific to PanoLLaVA (``wooseungw/panollava``) lives here, rebuilt from its
published facts (architectures, parameter names, defaults) in this package's own code;
nothing here imports PanoLLaVA or runs code from a checkpoint.
"""
