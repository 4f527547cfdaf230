/* The two system calls of pelagos_bpf's hot paths, without ctypes (optional build).
 *
 * Why: through ctypes, a fresh process builds the CDLL and the syscall() prototype before its
 * first bpf(2), and every call converts its arguments; here a call is one C function call
 * (docs/BPF_LAYER.md; bench/bench_backends.py times both backends). bpfsys.py falls back
 * to ctypes when this module was not built; both return -errno on failure, so the callers
 * cannot tell them apart.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

/* bpf(cmd, attr) -> result or -errno. attr: a writable buffer (a ctypes attr structure),
 * passed whole as union bpf_attr; the kernel may write into it (PROG_QUERY, batch ops). */
static PyObject *sys_bpf(PyObject *self, PyObject *args)
{
    int cmd;
    Py_buffer attr;
    long ret;
    int err = 0;

    if (!PyArg_ParseTuple(args, "iw*:bpf", &cmd, &attr))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    ret = syscall(__NR_bpf, cmd, attr.buf, (unsigned int)attr.len);
    if (ret < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&attr);
    return PyLong_FromLong(ret < 0 ? -err : ret);
}

/* statfs_type(path) -> f_type of the filesystem holding path, or -errno (os.statvfs has no
 * f_type, and trust.is_bpffs needs it on the first attach). */
static PyObject *sys_statfs_type(PyObject *self, PyObject *args)
{
    PyObject *path;
    struct statfs st;
    int ret, err = 0;

    if (!PyArg_ParseTuple(args, "O&:statfs_type", PyUnicode_FSConverter, &path))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    ret = statfs(PyBytes_AS_STRING(path), &st);
    if (ret < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (ret < 0)
        return PyLong_FromLong(-err);
    return PyLong_FromUnsignedLong((unsigned long)st.f_type & 0xFFFFFFFFUL);
}

static PyMethodDef methods[] = {
    {"bpf", sys_bpf, METH_VARARGS, "bpf(cmd, attr) -> result or -errno"},
    {"statfs_type", sys_statfs_type, METH_VARARGS, "statfs_type(path) -> f_type or -errno"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pelagos_bpf._sys", "bpf(2) and statfs(2) without ctypes.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__sys(void)
{
    return PyModule_Create(&module);
}
