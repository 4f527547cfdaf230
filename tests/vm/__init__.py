"""QEMU kernel-matrix runner: boots Debian kernels with the host's root shared read-only and
runs the test suite inside (see docs/KERNEL_MATRIX.md). Stdlib only."""
