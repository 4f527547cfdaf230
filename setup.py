"""Only the optional C extension lives here; everything else is in pyproject.toml.

pelagos_bpf._sys issues bpf(2) and statfs(2) without ctypes (faster first and later calls,
see pelagos_bpf/_sys.c). optional=True: without a C compiler or Python headers the install
still succeeds and pelagos_bpf.bpfsys uses ctypes (`bpfsys.BACKEND` says which).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pelagos_bpf._sys", ["pelagos_bpf/_sys.c"], optional=True)])
