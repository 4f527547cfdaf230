"""QEMU kernel-matrix runner: boots Debian kernels with the host's root shared read-only and
runs the test suite inside (see docs/TESTING.md). Stdlib only."""
