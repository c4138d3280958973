"""One module per op: its public front end, input checks, reference, fake kernel, autograd and its kernel
per backend (registered with skd_kernels._dispatch). Adding an op = adding a module here."""
