"""Statistics rows of tensors: the row layout and step buffer; ATen, Triton and CPU kernels behind one dispatch."""
