"""Where a NaN/Inf was made: the operator, module and line (``locate_nonfinite``), and the watch's tripwire."""
