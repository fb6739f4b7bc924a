/* dgate: a gate's decision in one call (the backend in gate_kernel.py; built by the install).

   A gate after a stage is an average pooling over an s x s grid of even windows and a linear
   layer, then the exit rule. The reference (runtime/decisions.py) runs these as several PyTorch
   operations; here they are one call: dgate_gate1 for one sample (its score; the outputs stay
   here for dgate_outputs), dgate_gates for a batch (outputs and who leaves). Measured gains are in
   benchmarks/RESULTS.md.

   Plain C99 with GCC vector extensions and fixed float32 arithmetic (no -ffast-math, no fused
   multiply-add contraction): the results depend neither on the compiler's choices nor on the
   instruction set; against the reference they differ by float rounding (tested with a tolerance). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* AVX2 and a baseline copy of the two loops, picked when the library loads (GCC, x86-64, glibc) */
#if defined(__GNUC__) && __GNUC__ >= 6 && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* an unaligned load */

/* One gate: its weights (k, s*s*c) in (s, s, c) order and bias (k), the stage output's shape
   (c, h, w; h and w multiples of s) and order (nhwc: 0 for (c, h, w), 1 for (h, w, c)), and the
   exit rule (0: the largest output, 1: the largest minus the second). Filled in once, from Python:
   each call then passes two or six arguments - ctypes converts each one, ~1 us apiece when cold. */
struct dgate_gate {
    const float *wt, *b;
    int c, h, w, s, nhwc, k, rule;
};

static __thread float *tl_buf = NULL; /* per thread (kept until the process ends, a few KB): work */
static __thread size_t tl_cap = 0;
static __thread int tl_d = 0, tl_k = 0; /* where dgate_gate1's last outputs are, and how many */

static float *buffer(size_t n)
{
    if (n > tl_cap) {
        float *p = (float *)realloc(tl_buf, n * sizeof(float));
        if (!p)
            return NULL;
        tl_buf = p;
        tl_cap = n;
    }
    return tl_buf;
}

/* col[0..len) = the sum of the bh consecutive rows of len floats at band, in row order. */
static inline void column_sums(const float *restrict band, int len, int bh, float *restrict col)
{
    for (int i = 0; i < len; i++)
        col[i] = band[i];
    for (int y = 1; y < bh; y++) {
        const float *restrict r = band + (size_t)y * len;
        for (int i = 0; i < len; i++)
            col[i] += r[i];
    }
}

/* One sample x (c, h, w) or (h, w, c) -> pooled: d = s*s*c features in (s, s, c) order, the
   order of the weights passed in. Each feature is the sum over its window's columns (x order) of
   the column sums over its rows (y order), times 1 / (bh * bw): the same additions for either
   layout. col: w * c floats of work. */
CLONES static void pool(const float *restrict x, int c, int h, int w, int s, int nhwc, float *restrict pooled,
                        float *restrict col)
{
    const int bh = h / s, bw = w / s;
    const float inv = 1.0f / (float)(bh * bw);
    if (nhwc) {
        const int row = w * c;
        for (int gy = 0; gy < s; gy++) {
            column_sums(x + (size_t)gy * bh * row, row, bh, col);
            for (int gx = 0; gx < s; gx++) {
                const float *restrict cx = col + (size_t)gx * bw * c;
                float *restrict dst = pooled + ((size_t)gy * s + gx) * c;
                for (int ch = 0; ch < c; ch++)
                    dst[ch] = cx[ch];
                for (int xx = 1; xx < bw; xx++)
                    for (int ch = 0; ch < c; ch++)
                        dst[ch] += cx[(size_t)xx * c + ch];
                for (int ch = 0; ch < c; ch++)
                    dst[ch] *= inv;
            }
        }
    } else {
        for (int ch = 0; ch < c; ch++) {
            const float *plane = x + (size_t)ch * h * w;
            for (int gy = 0; gy < s; gy++) {
                column_sums(plane + (size_t)gy * bh * w, w, bh, col);
                for (int gx = 0; gx < s; gx++) {
                    const float *cx = col + gx * bw;
                    float t = cx[0];
                    for (int xx = 1; xx < bw; xx++)
                        t += cx[xx];
                    pooled[((size_t)gy * s + gx) * c + ch] = t * inv;
                }
            }
        }
    }
}

/* One output: 8 interleaved partial sums of weight x feature (lane i mod 8) added pairwise, then
   the d mod 8 rest in order, then the bias. */
static float finish(const v8 *acc, const float *w, const float *p, int d8, int d, float bias)
{
    const v8 a = *acc;
    float t = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    for (int i = d8; i < d; i++)
        t += w[i] * p[i];
    return t + bias;
}

/* z = wt (k, d) x pooled + b, four outputs at a time (four independent chains of additions). */
CLONES static void linear(const float *restrict pooled, int d, const float *restrict wt, const float *restrict b, int k,
                          float *restrict z)
{
    const int d8 = d - d % 8;
    int j = 0;
    for (; j + 4 <= k; j += 4) {
        const float *w0 = wt + (size_t)j * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int i = 0; i < d8; i += 8) {
            const v8 p = *(const v8u *)(pooled + i);
            a0 += *(const v8u *)(w0 + i) * p;
            a1 += *(const v8u *)(w1 + i) * p;
            a2 += *(const v8u *)(w2 + i) * p;
            a3 += *(const v8u *)(w3 + i) * p;
        }
        z[j] = finish(&a0, w0, pooled, d8, d, b[j]);
        z[j + 1] = finish(&a1, w1, pooled, d8, d, b[j + 1]);
        z[j + 2] = finish(&a2, w2, pooled, d8, d, b[j + 2]);
        z[j + 3] = finish(&a3, w3, pooled, d8, d, b[j + 3]);
    }
    for (; j < k; j++) {
        const float *w0 = wt + (size_t)j * d;
        v8 a0 = {0};
        for (int i = 0; i < d8; i += 8)
            a0 += *(const v8u *)(w0 + i) * *(const v8u *)(pooled + i);
        z[j] = finish(&a0, w0, pooled, d8, d, b[j]);
    }
}

/* The exit score of k outputs: rule 0 the largest, rule 1 the largest minus the second (-inf
   padding for k = 1); NaN if an output is NaN (as torch's max and topk rank NaN first). */
static float score(const float *z, int k, int rule)
{
    float best = -INFINITY, second = -INFINITY;
    for (int j = 0; j < k; j++) {
        const float v = z[j];
        if (v != v)
            return NAN;
        if (v > best) {
            second = best;
            best = v;
        } else if (v > second) {
            second = v;
        }
    }
    return rule == 0 ? best : best - second;
}

/* x: one sample's stage output for gate g, dense float32. Returns its exit score (NaN if out of
   memory); the k outputs stay in this thread's buffer for dgate_outputs. */
float dgate_gate1(const float *x, const struct dgate_gate *g)
{
    const int c = g->c, w = g->w, s = g->s, k = g->k, d = s * s * c;
    tl_k = 0; /* no outputs until they are complete */
    float *pooled = buffer((size_t)d + (size_t)k + (size_t)w * c);
    if (!pooled)
        return NAN;
    float *z = pooled + d;
    pool(x, c, g->h, w, s, g->nhwc, pooled, z + k);
    linear(pooled, d, g->wt, g->b, k, z);
    tl_d = d;
    tl_k = k;
    return score(z, k, g->rule);
}

/* Copies the k outputs of this thread's last dgate_gate1 call to dst; returns how many (0 if k
   does not match). */
int dgate_outputs(float *dst, int k)
{
    if (k != tl_k || !tl_buf)
        return 0;
    memcpy(dst, tl_buf + tl_d, (size_t)k * sizeof(float));
    return k;
}

/* n samples of one stage output, each as for dgate_gate1 (consecutive, c*h*w floats apart): their
   outputs to z (n, k) and leave[i] = (score >= threshold), in float32 (NaN never leaves). Returns
   how many leave, or -1 if out of memory. */
int dgate_gates(const float *x, int n, const struct dgate_gate *g, float threshold, float *z, unsigned char *leave)
{
    const int c = g->c, h = g->h, w = g->w, s = g->s, k = g->k, d = s * s * c;
    float *pooled = buffer((size_t)d + (size_t)w * c);
    if (!pooled)
        return -1;
    tl_k = 0;
    const size_t per = (size_t)c * h * w;
    int count = 0;
    for (int i = 0; i < n; i++) {
        float *zi = z + (size_t)i * k;
        pool(x + per * i, c, h, w, s, g->nhwc, pooled, pooled + d);
        linear(pooled, d, g->wt, g->b, k, zi);
        const int go = score(zi, k, g->rule) >= threshold;
        leave[i] = (unsigned char)go;
        count += go;
    }
    return count;
}

/* The three functions as a CPython extension module (METH_FASTCALL). Pointers come in as Python ints. */

static int args_ok(Py_ssize_t nargs, Py_ssize_t want, const char *usage)
{
    if (nargs == want)
        return 1;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", usage, want, nargs);
    return 0;
}

static PyObject *py_gate1(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!args_ok(nargs, 2, "gate(x, params)"))
        return NULL;
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    const struct dgate_gate *g = (const struct dgate_gate *)PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred())
        return NULL;
    return PyFloat_FromDouble((double)dgate_gate1(x, g));
}

static PyObject *py_outputs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!args_ok(nargs, 2, "outputs(dst, k)"))
        return NULL;
    float *dst = (float *)PyLong_AsVoidPtr(args[0]);
    const long k = PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(dgate_outputs(dst, (int)k));
}

static PyObject *py_gates(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!args_ok(nargs, 6, "gates(x, n, params, threshold, z, leave)"))
        return NULL;
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    const long n = PyLong_AsLong(args[1]);
    const struct dgate_gate *g = (const struct dgate_gate *)PyLong_AsVoidPtr(args[2]);
    const double t = PyFloat_AsDouble(args[3]);
    float *z = (float *)PyLong_AsVoidPtr(args[4]);
    unsigned char *leave = (unsigned char *)PyLong_AsVoidPtr(args[5]);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(dgate_gates(x, (int)n, g, (float)t, z, leave));
}

static PyMethodDef methods[] = {
    {"gate", (PyCFunction)(void (*)(void))py_gate1, METH_FASTCALL, "one sample's exit score"},
    {"outputs", (PyCFunction)(void (*)(void))py_outputs, METH_FASTCALL, "the last gate() call's outputs"},
    {"gates", (PyCFunction)(void (*)(void))py_gates, METH_FASTCALL, "a batch's outputs and who leaves"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gates", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gates(void)
{
    return PyModule_Create(&module);
}
