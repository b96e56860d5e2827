"""C++ sources of the native CPU kernels, shipped with the package as `afrl_fast_csrc` so a regular
(non-editable) install can still build them on first use (see `afrl_fast.backends`)."""
