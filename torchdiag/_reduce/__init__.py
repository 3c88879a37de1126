"""Host-side accumulators of a step and their declared reductions across ranks: process groups, DTensor."""
