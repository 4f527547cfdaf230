# Types of the C extension pelagos_bpf/_sys.c (bpf(2) and statfs(2) without ctypes).
from _typeshed import StrOrBytesPath, WriteableBuffer

def bpf(cmd: int, attr: WriteableBuffer, /) -> int:
    """bpf(2) with `attr` passed whole as union bpf_attr: the result, or -errno."""

def statfs_type(path: StrOrBytesPath, /) -> int:
    """The f_type of the filesystem holding `path`, or -errno."""
