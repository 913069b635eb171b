/* The stream clusterer's per-sample loop (runtime/clustering.py, StreamClusterer._fit_rows), the
 * repair (repair: split, reassign, dissolve and merge, below; move: the re-clustering's moves), the
 * repair's re-clustering (ward_cut: runtime/recluster.py's better_partition after its distance
 * matrix), and two helpers of each call (unit_rows: the cosine normalisation; find_ids: the slots of
 * cluster ids).
 *
 * Each sample must meet the prototypes exactly as the samples before it left them, so the loop is
 * sequential: score every prototype, take the nearest two, and either learn the sample into the
 * winner (running sum, decayed count, spread, the searched prototype) or stop and let Python open
 * a cluster. In numpy each of those steps is a call costing about a microsecond whatever its size
 * (~20 us per sample at 170 clusters); here the same arithmetic is a few microseconds, without
 * the GIL. What changes the set of clusters between repairs (open, evict, merge) stays in Python:
 * the loop returns at the first row that needs one, and Python calls it again after.
 *
 * Dot products use 8 running sums in a fixed order (AVX2, SSE2 or NEON vectors where available), so a
 * row's scores never depend on where the row sits in the batch (unlike a BLAS matrix product): a
 * batch and the same samples one at a time give bit-identical results. Each sample reads every
 * prototype, so beyond about a thousand clusters the loop is bound by memory bandwidth, and
 * clustering.py hands larger states to its numpy loop, whose matrix product reads the prototypes
 * once per batch.
 *
 * fit_rows(x, inv, xx, search, sums, counts, spread, seen, last, sqn, ids, out_j, out_d, out_c,
 *          n, start, end, step0, threshold, merge, root_merge, temperature, labels, cls, out)
 *   x      float32 [rows, d]  samples in the searched space (unit length for cosine)
 *   inv    float64 [rows]     the stored weight of each sample (a learned sample adds
 *                             (float)(x * inv) to its winner's sum, as numpy's float32 x float64)
 *   xx     None (cosine) or float64 [rows]: |x|^2 for squared Euclidean distance
 *   search float32 [cap, d], sums float32 [cap, d], counts float64 [cap], spread float64 [cap],
 *   seen int64 [cap], last int64 [cap], sqn float32 [cap]: the clusterer's slot arrays
 *   ids int64 [cap], labels list (n items): each slot's cluster id and name
 *   out_j int64 [rows], out_d float64 [rows], out_c float64 [rows]: winner, distance, confidence
 *   n live slots; rows start..end-1; step0 = the step of row 0.
 *   cls, out: each learned row's result, cls(cluster id, distance, confidence, False, name) (a
 *   tuple subclass: clustering.Assignment), is appended to the list out, in row order.
 * Returns (row, event, k, dk): event 0: rows start..end-1 were learned (row == end); 1: row needs a
 * new cluster (nothing learned for it; out_d[row] = its distance, k/dk the runner-up); 2: row was
 * learned and its winner out_j[row] and runner-up k are close enough for the merge rules.
 *
 * ward_cut(dist, current, out, span, margin) -> K
 *   dist float64 [n, n] the memory's distance matrix (recluster.py's, as the reference computes
 *   it), current int64 [n] its partition (labels 0..K0-1), out int64 [n]: the Ward cut with
 *   K0 +- span clusters whose silhouette beats current's by more than margin, if any (K > 0; out
 *   holds its labels), else 0 (out untouched). scipy's linkage algorithm step for step, then the
 *   cuts and their silhouettes: O(n^2), in plain C like the loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EV_DONE 0
#define EV_OPEN 1
#define EV_MERGE 2

/* Eight running sums, lane k taking elements k, k+8, k+16, ...: in vector registers where the
 * platform has them (SSE2 on x86-64, NEON on aarch64: both baseline, so no run-time dispatch) and
 * in a plain array otherwise, with the same arithmetic in the same order either way. */
#if defined(__SSE2__)
#include <emmintrin.h>
typedef __m128 vec4;
#define VLOAD(p) _mm_loadu_ps(p)
#define VADD(a, b) _mm_add_ps(a, b)
#define VMUL(a, b) _mm_mul_ps(a, b)
#define VZERO() _mm_setzero_ps()
#define VSTORE(p, v) _mm_storeu_ps(p, v)
#define HAVE_VEC 1
#elif defined(__ARM_NEON)
#include <arm_neon.h>
typedef float32x4_t vec4;
#define VLOAD(p) vld1q_f32(p)
#define VADD(a, b) vaddq_f32(a, b)
#define VMUL(a, b) vmulq_f32(a, b) /* not vfmaq: a separate multiply rounds as the scalar code does */
#define VZERO() vdupq_n_f32(0.0f)
#define VSTORE(p, v) vst1q_f32(p, v)
#define HAVE_VEC 1
#endif

static float reduce8(const float *a, const float *x, const float *p, Py_ssize_t i, Py_ssize_t d)
{
    float acc[8];
    memcpy(acc, a, sizeof(acc));
    for (; i < d; i++) /* the tail of a width that is not a multiple of 8 */
        acc[i & 7] += x[i] * p[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static float dot(const float *a, const float *b, Py_ssize_t d)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    Py_ssize_t i = 0;
#ifdef HAVE_VEC
    vec4 lo = VZERO(), hi = VZERO();
    for (; i + 8 <= d; i += 8) {
        lo = VADD(lo, VMUL(VLOAD(a + i), VLOAD(b + i)));
        hi = VADD(hi, VMUL(VLOAD(a + i + 4), VLOAD(b + i + 4)));
    }
    VSTORE(acc, lo);
    VSTORE(acc + 4, hi);
#else
    for (; i + 8 <= d; i += 8)
        for (int k = 0; k < 8; k++)
            acc[k] += a[i + k] * b[i + k];
#endif
    return reduce8(acc, a, b, i, d);
}

/* dot4 (below) in 8-wide AVX vectors: lane k of one vector is lane k of dot()'s two 4-wide ones,
 * the multiplies and adds are separate (the target has no FMA to contract them into), so the sums
 * are bit for bit the same, in half the instructions. Chosen at run time (x86-64's baseline is
 * SSE2 only). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX_PATH 1
static int use_avx2;

__attribute__((target("avx2"))) static void dot4_avx2(const float *x, const float *p, Py_ssize_t d, float out[4])
{
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    Py_ssize_t i = 0;
    for (; i + 8 <= d; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        for (int q = 0; q < 4; q++)
            acc[q] = _mm256_add_ps(acc[q], _mm256_mul_ps(xv, _mm256_loadu_ps(p + q * d + i)));
    }
    for (int q = 0; q < 4; q++) {
        float a[8];
        _mm256_storeu_ps(a, acc[q]);
        out[q] = reduce8(a, x, p + q * d, i, d);
    }
}
#endif

/* dot(x, p + q * d) for q = 0..3, each in exactly dot()'s order (a score never depends on which
 * of the two computed it); four independent chains of sums instead of one keep the adder busy. */
static void dot4(const float *x, const float *p, Py_ssize_t d, float out[4])
{
#ifdef HAVE_AVX_PATH
    if (use_avx2) {
        dot4_avx2(x, p, d, out);
        return;
    }
#endif
#ifdef HAVE_VEC
    vec4 lo[4] = {VZERO(), VZERO(), VZERO(), VZERO()}, hi[4] = {VZERO(), VZERO(), VZERO(), VZERO()};
    Py_ssize_t i = 0;
    for (; i + 8 <= d; i += 8) {
        vec4 xl = VLOAD(x + i), xh = VLOAD(x + i + 4);
        for (int q = 0; q < 4; q++) {
            lo[q] = VADD(lo[q], VMUL(xl, VLOAD(p + q * d + i)));
            hi[q] = VADD(hi[q], VMUL(xh, VLOAD(p + q * d + i + 4)));
        }
    }
    for (int q = 0; q < 4; q++) {
        float acc[8];
        VSTORE(acc, lo[q]);
        VSTORE(acc + 4, hi[q]);
        out[q] = reduce8(acc, x, p + q * d, i, d);
    }
#else
    for (int q = 0; q < 4; q++)
        out[q] = dot(x, p + q * d, d);
#endif
}

/* Buffer q of a function's arguments into b[q] (see get), counted in `got` so that `done:` releases
 * exactly the buffers taken; on failure, straight to `done`. */
#define TAKE(q, name, kind, ndim, len, width, writable)                                \
    do {                                                                              \
        if (get(args[q], &b[q], name, kind, ndim, len, width, writable) < 0)          \
            goto done;                                                                \
        got++;                                                                        \
    } while (0)

/* Each function takes a fixed number of positional arguments (METH_FASTCALL). */
static int nargs_ok(Py_ssize_t nargs, Py_ssize_t want, const char *name)
{
    if (nargs == want)
        return 1;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, want);
    return 0;
}

/* A C-contiguous array of `kind` ('f' float32, 'd' float64, 'q' int64, '?' bool) with `ndim` dimensions and
 * at least `len` rows (and `width` columns when 2-D); writable when asked. */
static int get(PyObject *obj, Py_buffer *view, const char *name, char kind, int ndim, Py_ssize_t len,
               Py_ssize_t width, int writable)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    int ok;
    switch (kind) {
    case 'f': ok = f[0] == 'f' && view->itemsize == 4; break;
    case 'd': ok = f[0] == 'd' && view->itemsize == 8; break;
    case '?': ok = (f[0] == '?' || f[0] == 'B') && view->itemsize == 1; break;
    default:  ok = (f[0] == 'q' || f[0] == 'l') && view->itemsize == 8; break;
    }
    ok = ok && f[1] == '\0' && view->ndim == ndim && view->shape[0] >= len;
    if (ok && ndim == 2 && width >= 0)
        ok = view->shape[1] == width;
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "_rowloop: %s has the wrong dtype or shape", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

enum { X, INV, XX, SEARCH, SUMS, COUNTS, SPREAD, SEEN, LAST, SQN, IDS, OUT_J, OUT_D, OUT_C, N_BUF };

static PyObject *fit_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 25, "fit_rows"))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[14]), start = PyLong_AsSsize_t(args[15]);
    Py_ssize_t end = PyLong_AsSsize_t(args[16]);
    long long step0 = PyLong_AsLongLong(args[17]);
    double tau = PyFloat_AsDouble(args[18]), merge = PyFloat_AsDouble(args[19]);
    double root_merge = PyFloat_AsDouble(args[20]), temp = PyFloat_AsDouble(args[21]);
    PyObject *labels = args[22], *cls = args[23], *results = args[24];
    if (PyErr_Occurred())
        return NULL;
    if (n < 0 || start < 0 || end < start) {
        PyErr_SetString(PyExc_ValueError, "fit_rows: bad row range or slot count");
        return NULL;
    }
    if (!PyList_Check(labels) || PyList_GET_SIZE(labels) < n || !PyList_Check(results) || !PyType_Check(cls) ||
        !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "fit_rows: labels and out must be lists (labels with n names), cls a tuple type");
        return NULL;
    }
    int cosine = args[XX] == Py_None;
    Py_buffer b[N_BUF];
    int got = 0;
    /* the sample arrays first, to learn d; then the slot arrays, at least n slots long */
    static const char kinds[N_BUF] = {'f', 'd', 'd', 'f', 'f', 'd', 'd', 'q', 'q', 'f', 'q', 'q', 'd', 'd'};
    static const char *names[N_BUF] = {"x", "inv", "xx", "search", "sums", "counts", "spread", "seen", "last",
                                       "sqn", "ids", "out_j", "out_d", "out_c"};
    static const char twod[N_BUF] = {1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    Py_ssize_t d = -1;  /* x's width, which every other 2-D array must share */
    for (; got < N_BUF; got++) {
        if (got == XX && cosine) {
            memset(&b[XX], 0, sizeof(Py_buffer));
            continue;
        }
        /* per-sample arrays hold at least `end` rows, per-slot arrays at least n */
        Py_ssize_t len = (got <= XX || got >= OUT_J) ? end : n;
        if (get(args[got], &b[got], names[got], kinds[got], twod[got] ? 2 : 1, len, d,
                got >= SEARCH && got != IDS) < 0)
            goto fail;
        if (got == X)
            d = b[X].shape[1];
    }

    const float *x = b[X].buf;
    const double *inv = b[INV].buf, *xx = cosine ? NULL : b[XX].buf;
    float *search = b[SEARCH].buf, *sums = b[SUMS].buf, *sqn = b[SQN].buf;
    double *counts = b[COUNTS].buf, *spread = b[SPREAD].buf, *out_d = b[OUT_D].buf, *out_c = b[OUT_C].buf;
    int64_t *seen = b[SEEN].buf, *last = b[LAST].buf, *out_j = b[OUT_J].buf;
    Py_ssize_t i = start, k = -1;
    int event = EV_DONE;
    double dk = INFINITY;

    Py_BEGIN_ALLOW_THREADS
    for (; i < end; i++) {
        const float *xi = x + i * d;
        k = -1;
        dk = INFINITY;
        if (n == 0) {
            out_d[i] = INFINITY;
            event = EV_OPEN;
            break;
        }
        /* nearest and runner-up by score (x.p, minus |p|^2/2 for squared Euclidean); ties go to
         * the lower slot, as numpy's argmax does */
        float best = -INFINITY, second = -INFINITY;
        Py_ssize_t j = -1;
        float v4[4] = {0, 0, 0, 0};
        for (Py_ssize_t s = 0; s < n; s++) {
            Py_ssize_t q = s & 3;
            if (q == 0) {
                if (s + 4 <= n)
                    dot4(xi, search + s * d, d, v4);
                else
                    for (Py_ssize_t r = s; r < n; r++)
                        v4[r - s] = dot(xi, search + r * d, d);
            }
            float v = v4[q];
            if (!cosine)
                v -= 0.5f * sqn[s];
            if (v > best || j < 0) {
                second = best;
                k = j;
                best = v;
                j = s;
            } else if (v > second || k < 0) {
                second = v;
                k = s;
            }
        }
        double dj = cosine ? 2.0 - 2.0 * (double)best : xx[i] - 2.0 * (double)best;
        if (dj < 0.0)
            dj = 0.0;
        if (k >= 0) {
            dk = cosine ? 2.0 - 2.0 * (double)second : xx[i] - 2.0 * (double)second;
            if (dk < 0.0)
                dk = 0.0;
        }
        if (dj > tau) {
            out_d[i] = dj;
            event = EV_OPEN;
            break;
        }
        /* learn: the pre-scaled sample joins the winner's sum; the searched prototype follows */
        float *m = sums + j * d, *p = search + j * d;
        for (Py_ssize_t c = 0; c < d; c++)
            m[c] += (float)((double)xi[c] * inv[i]);
        counts[j] += inv[i];
        spread[j] += inv[i] * dj;
        seen[j] += 1;
        last[j] = step0 + i;
        if (cosine) {
            float f = (float)(1.0 / sqrt((double)dot(m, m, d)));
            for (Py_ssize_t c = 0; c < d; c++)
                p[c] = m[c] * f;
        } else {
            double f = 1.0 / counts[j];
            for (Py_ssize_t c = 0; c < d; c++)
                p[c] = (float)((double)m[c] * f);
            sqn[j] = dot(p, p, d);
        }
        out_j[i] = j;
        out_d[i] = dj;
        out_c[i] = 1.0 / (1.0 + (k >= 0 ? exp(temp * (dj - dk)) : 0.0) + exp(temp * (dj - tau)));
        /* the winner moved towards x, so |p_j - p_k| >= |x - p_k| - |x - p_j|: only when that
         * bound is below the merge distance can the pair be close enough */
        if (k >= 0 && merge > 0 && sqrt(dk) - sqrt(dj) < root_merge) {
            double pq = (double)dot(p, search + k * d, d);
            if ((double)sqn[j] + (double)sqn[k] - 2.0 * pq < merge) {
                event = EV_MERGE;
                break;
            }
        }
    }
    Py_END_ALLOW_THREADS

    /* the results of the rows learned: start..i-1, and row i too when it stopped for a merge check */
    const int64_t *ids = b[IDS].buf;
    PyTypeObject *type = (PyTypeObject *)cls;
    int ok = 1;
    for (Py_ssize_t r = start; r < (event == EV_MERGE ? i + 1 : i) && ok; r++) {
        PyObject *t = type->tp_alloc(type, 5), *name = PyList_GET_ITEM(labels, out_j[r]);
        PyObject *v[4] = {PyLong_FromLongLong(ids[out_j[r]]), PyFloat_FromDouble(out_d[r]),
                          PyFloat_FromDouble(out_c[r]), Py_False};
        ok = t != NULL && v[0] != NULL && v[1] != NULL && v[2] != NULL;
        Py_INCREF(Py_False);
        Py_INCREF(name);
        if (t != NULL) {  /* as tuple.__new__(cls, items) fills a tuple subclass */
            for (int q = 0; q < 4; q++)
                PyTuple_SET_ITEM(t, q, v[q]);
            PyTuple_SET_ITEM(t, 4, name);
            ok = ok && PyList_Append(results, t) == 0;
            Py_DECREF(t);
        } else {
            for (int q = 0; q < 4; q++)
                Py_XDECREF(v[q]);
            Py_DECREF(name);
        }
    }
    for (int q = 0; q < N_BUF; q++)
        if (!(q == XX && cosine))
            PyBuffer_Release(&b[q]);
    if (!ok)
        return NULL;
    return Py_BuildValue("nind", i, event, k, dk);

fail:
    for (int q = 0; q < got; q++)
        if (!(q == XX && cosine))
            PyBuffer_Release(&b[q]);
    return NULL;
}


/* The row of X (m rows) farthest from c, copied to out (the 2-means' starting points). */
static void farthest(const float *X, Py_ssize_t m, Py_ssize_t d, const double *c, double *out)
{
    Py_ssize_t best = 0;
    double top = -1.0;
    for (Py_ssize_t r = 0; r < m; r++) {
        double s = 0.0;
        for (Py_ssize_t k = 0; k < d; k++) {
            double t = (double)X[r * d + k] - c[k];
            s += t * t;
        }
        if (s > top) { /* the first of equals, as numpy's argmax */
            top = s;
            best = r;
        }
    }
    for (Py_ssize_t k = 0; k < d; k++)
        out[k] = X[best * d + k];
}

/* 2-means inside each of G groups of consecutive rows of X (float32 [R, d]; group g has sizes[g]
 * rows), as _two_means in clustering.py computes it (see there), in double precision: writes mask
 * (the rows of each group's second half) and gap (squared distance between the halves' means, 0
 * if a half is empty); work: 5 d doubles. */
static void two_means_core(const float *X, const int64_t *sizes, Py_ssize_t G, Py_ssize_t d, long iters,
                           unsigned char *mask, double *gap, double *work)
{
    double *total = work, *a = work + d, *b = work + 2 * d, *c = work + 3 * d, *sb = work + 4 * d;
    Py_ssize_t start = 0;
    for (Py_ssize_t g = 0; g < G; g++) {
        Py_ssize_t m = (Py_ssize_t)sizes[g];
        const float *Xg = X + start * d;
        unsigned char *mg = mask + start;
        for (Py_ssize_t k = 0; k < d; k++)
            total[k] = 0.0;
        for (Py_ssize_t r = 0; r < m; r++)
            for (Py_ssize_t k = 0; k < d; k++)
                total[k] += Xg[r * d + k];
        for (Py_ssize_t k = 0; k < d; k++)
            c[k] = total[k] / (double)m;
        farthest(Xg, m, d, c, a);
        farthest(Xg, m, d, a, b);
        double nb = 0.0;
        for (long it = 0; it < iters; it++) {
            double aa = 0.0, bbn = 0.0;
            for (Py_ssize_t k = 0; k < d; k++) {
                aa += a[k] * a[k];
                bbn += b[k] * b[k];
            }
            double half = 0.5 * (bbn - aa);
            int changed = it == 0;
            for (Py_ssize_t r = 0; r < m; r++) {
                double s = 0.0;
                for (Py_ssize_t k = 0; k < d; k++)
                    s += (double)Xg[r * d + k] * (b[k] - a[k]);
                unsigned char v = s > half;
                changed |= v != mg[r];
                mg[r] = v;
            }
            if (!changed)
                break;
            nb = 0.0;
            for (Py_ssize_t k = 0; k < d; k++)
                sb[k] = 0.0;
            for (Py_ssize_t r = 0; r < m; r++)
                if (mg[r]) {
                    nb += 1.0;
                    for (Py_ssize_t k = 0; k < d; k++)
                        sb[k] += Xg[r * d + k];
                }
            double na = (double)m - nb;
            for (Py_ssize_t k = 0; k < d; k++) {
                a[k] = (total[k] - sb[k]) / (na > 1.0 ? na : 1.0);
                b[k] = sb[k] / (nb > 1.0 ? nb : 1.0);
            }
        }
        gap[g] = 0.0;
        if (nb > 0.0 && nb < (double)m)
            for (Py_ssize_t k = 0; k < d; k++)
                gap[g] += (a[k] - b[k]) * (a[k] - b[k]);
        start += m;
    }
}

/* The repair's arithmetic (StreamClusterer._split, _reassign, _move and _closest_pair in
 * clustering.py): the same steps as their numpy code, in which each is a dozen calls of a few
 * microseconds on arrays of a few hundred rows. Slots are checked against n, the live slots. */

static int slot_ok(const int64_t *s, Py_ssize_t m, Py_ssize_t n, const char *fn)
{
    for (Py_ssize_t i = 0; i < m; i++)
        if (s[i] < 0 || s[i] >= n) {
            PyErr_Format(PyExc_ValueError, "%s: slot %lld is not a live slot (0..%zd)", fn, (long long)s[i], n - 1);
            return 0;
        }
    return 1;
}

/* _split's candidates and their 2-means: a slot is tested when at least split_min rows of x belong
 * to it, two of them fresh; its rows go to `rows` (slots in ascending order, each slot's rows in
 * the order of x: a stable grouping), the slots to `tested`, their row counts to `sizes`, and the
 * 2-means over those groups fills `mask` and `gap`. Returns the number of tested slots, their rows
 * in *r_out; count (2 n int64, all zero), start (n int64), X (m d floats) and work (5 d doubles)
 * are scratch. */
static Py_ssize_t split_groups(const float *x, const int64_t *slots, const unsigned char *fresh, Py_ssize_t m,
                               Py_ssize_t d, Py_ssize_t n, Py_ssize_t split_min, long iters, int64_t *rows,
                               int64_t *sizes, int64_t *tested, unsigned char *mask, double *gap, int64_t *count,
                               int64_t *start, float *X, double *work, Py_ssize_t *r_out)
{
    Py_ssize_t k = 0, r = 0;
    int64_t *fcount = count + n;
    for (Py_ssize_t i = 0; i < m; i++) {
        count[slots[i]]++;
        fcount[slots[i]] += fresh[i] != 0;
    }
    for (Py_ssize_t s = 0; s < n; s++) {
        start[s] = -1;
        if (count[s] >= split_min && fcount[s] >= 2) {
            start[s] = r;
            tested[k] = s;
            sizes[k++] = count[s];
            r += count[s];
        }
    }
    for (Py_ssize_t i = 0; i < m; i++) {  /* each tested slot's rows, in the order of x */
        int64_t s = slots[i];
        if (start[s] >= 0) {
            Py_ssize_t at = (Py_ssize_t)start[s]++;
            rows[at] = i;
            memcpy(X + at * d, x + i * d, sizeof(float) * (size_t)d);
        }
    }
    if (k > 0)
        two_means_core(X, sizes, k, d, iters, mask, gap, work);
    *r_out = r;
    return k;
}

/* Make slot s's searched prototype match its sum (and count), as StreamClusterer._refresh_rows. */
static void refresh(float *search, float *sqn, const float *sums, const double *counts, Py_ssize_t s,
                    Py_ssize_t d, int cosine)
{
    const float *m = sums + s * d;
    float *p = search + s * d;
    if (cosine) {
        float norm = sqrtf(dot(m, m, d));
        if (norm < 1e-30f)
            norm = 1e-30f;
        for (Py_ssize_t c = 0; c < d; c++)
            p[c] = m[c] / norm;
        sqn[s] = 1.0f;
    } else {
        double q = 0.0;
        for (Py_ssize_t c = 0; c < d; c++) {
            double v = (double)m[c] / counts[s];
            p[c] = (float)v;
            q += v * v;
        }
        sqn[s] = (float)q;
    }
}

static double sqdist(const float *a, const float *b, Py_ssize_t d)
{
    float s = 0.0f;
    for (Py_ssize_t c = 0; c < d; c++) {
        float t = a[c] - b[c];
        s += t * t;
    }
    return (double)s;
}

/* move()'s arithmetic (below) on plain arrays; mark (n bytes) must be all zero and is left so,
 * leave holds m doubles. */
static void move_core(const float *x, const int64_t *src, const int64_t *dst, const double *w, Py_ssize_t m,
                      Py_ssize_t d, float *sums, double *counts, double *spread, int64_t *seen, float *search,
                      float *sqn, Py_ssize_t n, int cosine, char *mark, double *leave)
{
    for (Py_ssize_t i = 0; i < m; i++) {  /* the distance to the old prototype, before it moves */
        leave[i] = w[i] * sqdist(x + i * d, search + src[i] * d, d);
        mark[src[i]] = mark[dst[i]] = 1;
    }
    for (int pass = 0; pass < 2; pass++) {
        const int64_t *slot = pass ? dst : src;
        double sign = pass ? 1.0 : -1.0;
        for (Py_ssize_t i = 0; i < m; i++) {
            float *s = sums + slot[i] * d;
            const float *xi = x + i * d;
            for (Py_ssize_t c = 0; c < d; c++) {
                float wx = (float)((double)xi[c] * w[i]);
                s[c] += pass ? wx : -wx;
            }
            counts[slot[i]] += sign * w[i];
            seen[slot[i]] += pass ? 1 : -1;
        }
    }
    for (Py_ssize_t s = 0; s < n; s++)
        if (mark[s])
            refresh(search, sqn, sums, counts, s, d, cosine);
    for (Py_ssize_t i = 0; i < m; i++)
        spread[src[i]] += -leave[i];
    for (Py_ssize_t i = 0; i < m; i++)
        spread[dst[i]] += w[i] * sqdist(x + i * d, search + dst[i] * d, d);
    for (Py_ssize_t s = 0; s < n; s++)
        if (mark[s]) {
            if (spread[s] < 0.0)
                spread[s] = 0.0;
            if (seen[s] < 0)
                seen[s] = 0;
            mark[s] = 0;
        }
}

enum { MX, MSRC, MDST, MW, MSUMS, MCOUNTS, MSPREAD, MSEEN, MSEARCH, MSQN, M_BUF };

/* move(x, src, dst, weight, sums, counts, spread, seen, search, sqn, n, cosine): remembered samples
 * (rows of x, each with its weight in stored units) leave slot src[i] for dst[i], as
 * StreamClusterer._move does: every subtraction first, then every addition; the prototypes of the
 * slots involved are refreshed; each sample's distance to its old prototype leaves the old slot's
 * spread and its distance to the new one joins the new slot's; spreads and member counts of
 * those slots are clamped at 0 (rounding may leave a drained slot a little below). */
static PyObject *move(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 12, "move"))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[10]);
    int cosine = PyObject_IsTrue(args[11]);
    if ((n == -1 || cosine < 0) && PyErr_Occurred())
        return NULL;
    static const char kinds[M_BUF] = {'f', 'q', 'q', 'd', 'f', 'd', 'd', 'q', 'f', 'f'};
    static const char *names[M_BUF] = {"x", "src", "dst", "weight", "sums", "counts", "spread", "seen",
                                       "search", "sqn"};
    Py_buffer b[M_BUF];
    int got = 0;
    Py_ssize_t m = 0, d = -1;
    PyObject *result = NULL;
    char *mark = NULL;
    double *leave = NULL;
    for (; got < M_BUF; got++) {
        int twod = got == MX || got == MSUMS || got == MSEARCH;
        Py_ssize_t len = got == MX ? 0 : (got <= MW ? m : n);
        if (get(args[got], &b[got], names[got], kinds[got], twod ? 2 : 1, len, d, got >= MSUMS) < 0)
            goto done;
        if (got == MX) {
            m = b[MX].shape[0];
            d = b[MX].shape[1];
        }
    }
    const int64_t *src = b[MSRC].buf, *dst = b[MDST].buf;
    if (!slot_ok(src, m, n, "move") || !slot_ok(dst, m, n, "move"))
        goto done;
    mark = PyMem_Calloc(n > 0 ? (size_t)n : 1, 1);
    leave = PyMem_Malloc(sizeof(double) * (m > 0 ? (size_t)m : 1));
    if (mark == NULL || leave == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    move_core(b[MX].buf, src, dst, b[MW].buf, m, d, b[MSUMS].buf, b[MCOUNTS].buf, b[MSPREAD].buf, b[MSEEN].buf,
              b[MSEARCH].buf, b[MSQN].buf, n, cosine, mark, leave);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(mark);
    PyMem_Free(leave);
    for (int q = 0; q < got; q++)
        PyBuffer_Release(&b[q]);
    return result;
}

/* _closest_pair: among the pairs a < b of positions in `slots` whose prototypes are closer than
 * `cap` (squared distance), the one with the lowest Ward cost counts[a] counts[b] / (counts[a] +
 * counts[b]) x distance, skipping pairs whose codes are both >= 0 and differ (known classes with
 * different names): its positions in *ba_out, *bb_out (-1 if none), its cost returned. The first
 * of equal costs in row-major order, as numpy's argmin over the pairs. */
static double closest_core(const float *search, const float *sqn, const double *counts, const int64_t *slots,
                           const int64_t *codes, Py_ssize_t t, Py_ssize_t d, double cap, Py_ssize_t *ba_out,
                           Py_ssize_t *bb_out)
{
    Py_ssize_t ba = -1, bb = -1;
    double top = INFINITY;
    for (Py_ssize_t i = 0; i < t; i++)
        for (Py_ssize_t j = i + 1; j < t; j++) {
            if (codes[i] >= 0 && codes[j] >= 0 && codes[i] != codes[j])
                continue;
            int64_t sa = slots[i], sb = slots[j];
            double g = (double)dot(search + sa * d, search + sb * d, d);
            double dist = (double)sqn[sa] + (double)sqn[sb] - 2.0 * g;
            if (dist < 0.0)
                dist = 0.0;
            if (!(dist < cap))
                continue;
            double ca = counts[sa], cb = counts[sb];
            double cost = ca * cb / (ca + cb) * dist;
            if (cost < top || ba < 0) {
                top = cost;
                ba = i;
                bb = j;
            }
        }
    *ba_out = ba;
    *bb_out = bb;
    return top;
}

/* ---- unit_rows: StreamClusterer._prepare's cosine normalisation -------------------------------
 *
 * unit_rows(x, out) -> status: out = x / |x| row by row, as numpy computes
 * x / np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True)) in float32, to the bit: the squares
 * summed by numpy's pairwise summation (eight running sums, blocks of at most 128 split in
 * halves), the root and the division in float32. One pass over the rows instead of five array
 * operations, each on memory an embedding has just evicted from the cache. Status 0: done; 1: a
 * NaN or infinite value (out is not written); 2: a row of norm below 1e-12 (no direction). */

static float pairwise_sq(const float *a, Py_ssize_t n)
{
    if (n < 8) {
        float res = 0.0f;  /* numpy starts from -0.0 here; the squares make the sign moot */
        for (Py_ssize_t i = 0; i < n; i++)
            res += a[i] * a[i];
        return res;
    }
    if (n <= 128) {
        float r[8], res;
        Py_ssize_t i;
        for (int k = 0; k < 8; k++)
            r[k] = a[k] * a[k];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++)
                r[k] += a[i + k] * a[i + k];
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += a[i] * a[i];
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sq(a, n2) + pairwise_sq(a + n2, n - n2);
}

static PyObject *unit_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 2, "unit_rows"))
        return NULL;
    Py_buffer b[2];
    int got = 0;
    PyObject *result = NULL;
    TAKE(0, "x", 'f', 2, 0, -1, 0);
    Py_ssize_t m = b[0].shape[0], d = b[0].shape[1];
    TAKE(1, "out", 'f', 2, m, d, 1);
    const float *x = b[0].buf;
    float *out = b[1].buf;
    long status = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < m * d && !status; i++)
        status = !isfinite(x[i]);
    for (Py_ssize_t r = 0; r < m && !status; r++) {
        float norm = sqrtf(pairwise_sq(x + r * d, d));
        if (norm < 1e-12f) {
            status = 2;
            break;
        }
        for (Py_ssize_t c = 0; c < d; c++)
            out[r * d + c] = x[r * d + c] / norm;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromLong(status);
done:
    for (int q = 0; q < got; q++)
        PyBuffer_Release(&b[q]);
    return result;
}

/* ---- find_ids: StreamClusterer._slots_of's lookup of live ids --------------------------------
 *
 * find_ids(query, ids, n, out) -> missing: out[i] = the slot s < n with ids[s] == query[i], or -1
 * (an id merged away, evicted or removed: Python resolves those few through its aliases); returns
 * how many were not found. Ids are unique, so an open-addressing table of the n live ids answers
 * each query in a probe or two. */
static PyObject *find_ids(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 4, "find_ids"))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "find_ids: n must be >= 0");
        return NULL;
    }
    Py_buffer b[3];  /* query, ids, out */
    int got = 0;
    PyObject *result = NULL;
    int64_t *table = NULL;
    TAKE(0, "query", 'q', 1, 0, -1, 0);
    Py_ssize_t m = b[0].shape[0];
    TAKE(1, "ids", 'q', 1, n, -1, 0);
    if (get(args[3], &b[2], "out", 'q', 1, m, -1, 1) < 0)  /* (args[2] is n) */
        goto done;
    got++;
    size_t size = 16;
    while (size < 2 * (size_t)n)
        size *= 2;
    table = PyMem_Malloc(sizeof(int64_t) * size);  /* slot numbers, -1 = empty */
    if (table == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t *query = b[0].buf, *ids = b[1].buf;
    int64_t *out = b[2].buf;
    Py_ssize_t missing = 0;
    Py_BEGIN_ALLOW_THREADS
    memset(table, 0xff, sizeof(int64_t) * size);
    for (Py_ssize_t s = 0; s < n; s++) {
        size_t h = (size_t)((uint64_t)ids[s] * 0x9E3779B97F4A7C15ull) & (size - 1);
        while (table[h] >= 0)
            h = (h + 1) & (size - 1);
        table[h] = s;
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        size_t h = (size_t)((uint64_t)query[i] * 0x9E3779B97F4A7C15ull) & (size - 1);
        while (table[h] >= 0 && ids[table[h]] != query[i])
            h = (h + 1) & (size - 1);
        out[i] = table[h];
        missing += table[h] < 0;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(missing);
done:
    PyMem_Free(table);
    for (int q = 0; q < got; q++)
        PyBuffer_Release(&b[q]);
    return result;
}

/* ---- repair: StreamClusterer._repair's split, reassign and merge steps in one call -------------
 *
 * The same steps as _split, _reassign, _move_members and _merge_close in clustering.py (the numpy
 * loop's repair, and the reference for this one), in the same order, with the same slot
 * bookkeeping: a removed slot is filled by the last live slot. What only Python can do (the
 * clusters' names, the id -> slot dict, merge aliases, counters) is written to `ops`, one row per
 * change, for StreamClusterer._replay:
 *   OP_OPEN     slot, id                      a split opened a cluster
 *   OP_MERGE    kept slot, gone slot, kept id, gone id   (before the gone slot's OP_REMOVE)
 *   OP_REMOVE   slot, last slot, its id, last's id       last moved into slot (when they differ)
 *   OP_DISSOLVE id, heir id (-1: none)        a drained cluster (after its OP_REMOVE)
 * At most m / 2 opens (two members each), m dissolves and m - 1 merges (each touched slot holds a
 * remembered row), two rows each: ops holds 5 m + 8 rows.
 *
 * repair(x, slots, weight, fresh, mem_ids, sums, search, sqn, counts, spread, seen, created, last,
 *        ids, codes, ops, n, max_clusters, step, next_id, cscale, threshold, split_distance,
 *        split_min, merge_threshold, merge_cap, merge_cost, min_size, cosine)
 *   -> (n, next_id, n_ops, touched)
 *   x float32 [m, d], slots int64 [m] (updated), weight float64 [m], fresh bool [m]: the memory;
 *   mem_ids int64 [m] (out): each row's cluster id after the reassignment, before the merges;
 *   the slot arrays as fit_rows takes them, plus created, ids and codes (int64: -1 unlabelled,
 *   else one code per name), with room for min(n + m / 2, max_clusters) slots; step: the step a
 *   cluster opened now is created at; touched: slots the memory touches before the merges. */

#define OP_OPEN 1
#define OP_REMOVE 2
#define OP_DISSOLVE 3
#define OP_MERGE 4

typedef struct {
    Py_ssize_t d, n;
    float *sums, *search, *sqn;
    double *counts, *spread;
    int64_t *seen, *created, *last, *ids, *codes, *ops;
    Py_ssize_t n_ops;
    int cosine;
} slots_t;

static void log_op(slots_t *st, int64_t kind, int64_t a, int64_t b, int64_t c, int64_t e)
{
    int64_t *o = st->ops + 5 * st->n_ops++;
    o[0] = kind;
    o[1] = a;
    o[2] = b;
    o[3] = c;
    o[4] = e;
}

/* StreamClusterer._remove_slot */
static void remove_slot(slots_t *st, Py_ssize_t s)
{
    Py_ssize_t last = st->n - 1, d = st->d;
    log_op(st, OP_REMOVE, s, last, st->ids[s], st->ids[last]);
    if (s != last) {
        memcpy(st->sums + s * d, st->sums + last * d, sizeof(float) * (size_t)d);
        memcpy(st->search + s * d, st->search + last * d, sizeof(float) * (size_t)d);
        st->sqn[s] = st->sqn[last];
        st->counts[s] = st->counts[last];
        st->spread[s] = st->spread[last];
        st->seen[s] = st->seen[last];
        st->created[s] = st->created[last];
        st->last[s] = st->last[last];
        st->ids[s] = st->ids[last];
        st->codes[s] = st->codes[last];
    }
    st->n = last;
}

/* StreamClusterer._merge_slots; returns the kept slot's number before the gone one is removed. */
static Py_ssize_t merge_slots(slots_t *st, Py_ssize_t a, Py_ssize_t b)
{
    Py_ssize_t d = st->d;
    int64_t la = st->codes[a], lb = st->codes[b];
    int keep_a = ((la < 0) != (lb < 0)) ? la >= 0 : st->counts[a] >= st->counts[b];
    Py_ssize_t s = keep_a ? a : b, o = keep_a ? b : a;
    float dist = st->sqn[s] + st->sqn[o] - 2.0f * dot(st->search + s * d, st->search + o * d, d);
    double ca = st->counts[s], cb = st->counts[o];
    double merged = (st->spread[s] + st->spread[o] + ca * cb / (ca + cb) * (dist > 0.0f ? (double)dist : 0.0)) /
                    (ca + cb);
    st->spread[s] = merged * (ca + cb);
    float *ms = st->sums + s * d, *mo = st->sums + o * d;
    for (Py_ssize_t c = 0; c < d; c++)
        ms[c] += mo[c];
    st->counts[s] += st->counts[o];
    st->seen[s] += st->seen[o];
    if (st->created[o] < st->created[s])
        st->created[s] = st->created[o];
    if (st->last[o] > st->last[s])
        st->last[s] = st->last[o];
    if (st->codes[s] < 0)
        st->codes[s] = st->codes[o];
    refresh(st->search, st->sqn, st->sums, st->counts, s, d, st->cosine);
    log_op(st, OP_MERGE, s, o, st->ids[s], st->ids[o]);
    remove_slot(st, o);
    return s;
}

/* The sorted distinct slots of rows (each < n) into out; mark: n zero bytes, left zero. */
static Py_ssize_t distinct(const int64_t *slots, Py_ssize_t m, Py_ssize_t n, char *mark, int64_t *out)
{
    Py_ssize_t t = 0;
    for (Py_ssize_t i = 0; i < m; i++)
        mark[slots[i]] = 1;
    for (Py_ssize_t s = 0; s < n; s++)
        if (mark[s]) {
            out[t++] = s;
            mark[s] = 0;
        }
    return t;
}

enum { RX, RSLOTS, RW, RFRESH, RMEMIDS, RSUMS, RSEARCH, RSQN, RCOUNTS, RSPREAD, RSEEN, RCREATED, RLAST, RIDS,
       RCODES, ROPS, R_BUF };

static PyObject *repair(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 29, "repair"))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[16]), max_clusters = PyLong_AsSsize_t(args[17]);
    long long step = PyLong_AsLongLong(args[18]), next_id = PyLong_AsLongLong(args[19]);
    double cscale = PyFloat_AsDouble(args[20]), tau = PyFloat_AsDouble(args[21]);
    double split_distance = PyFloat_AsDouble(args[22]);
    Py_ssize_t split_min = PyLong_AsSsize_t(args[23]);
    double merge_threshold = PyFloat_AsDouble(args[24]), merge_cap = PyFloat_AsDouble(args[25]);
    double merge_cost = PyFloat_AsDouble(args[26]);
    Py_ssize_t min_size = PyLong_AsSsize_t(args[27]);
    int cosine = PyObject_IsTrue(args[28]);
    if (PyErr_Occurred() || cosine < 0)
        return NULL;
    if (n < 1 || max_clusters < n || split_min < 2) {
        PyErr_SetString(PyExc_ValueError, "repair: needs 1 <= n <= max_clusters and split_min >= 2");
        return NULL;
    }
    static const char kinds[R_BUF] = {'f', 'q', 'd', '?', 'q', 'f', 'f', 'f', 'd', 'd', 'q', 'q', 'q', 'q', 'q', 'q'};
    static const char *names[R_BUF] = {"x", "slots", "weight", "fresh", "mem_ids", "sums", "search", "sqn",
                                       "counts", "spread", "seen", "created", "last", "ids", "codes", "ops"};
    Py_buffer b[R_BUF];
    int got = 0;
    Py_ssize_t m = 0, d = -1, cap = 0;
    PyObject *result = NULL;
    char *arena = NULL;
    for (; got < R_BUF; got++) {
        int twod = got == RX || got == RSUMS || got == RSEARCH || got == ROPS;
        /* per-row arrays hold m rows; slot arrays room for the clusters splits may open */
        Py_ssize_t len = got == RX ? 0 : got <= RMEMIDS ? m : got == ROPS ? 5 * m + 8 : cap;
        if (get(args[got], &b[got], names[got], kinds[got], twod ? 2 : 1, len, got == ROPS ? 5 : d,
                got == RSLOTS || got >= RMEMIDS) < 0)
            goto done;
        if (got == RX) {
            m = b[RX].shape[0];
            d = b[RX].shape[1];
            cap = n + m / 2 < max_clusters ? n + m / 2 : max_clusters;
        }
    }
    int64_t *slots = b[RSLOTS].buf;
    if (!slot_ok(slots, m, n, "repair"))
        goto done;
    /* scratch, in one block: the split's groups and 2-means, the moves, the heirs' votes */
    size_t cap_s = (size_t)cap + 1, m_s = (size_t)m + 1, d_s = (size_t)(d > 0 ? d : 1);
    size_t bytes = sizeof(int64_t) * (m_s * 6 + cap_s * 8) + sizeof(double) * (m_s * 2 + cap_s + 5 * d_s) +
                   sizeof(float) * 2 * m_s * d_s + cap_s + m_s;
    arena = PyMem_Malloc(bytes);
    if (arena == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    char *at = arena;
#define CARVE(type, count) ((type *)(at += sizeof(type) * (count), at - sizeof(type) * (count)))
    int64_t *rows = CARVE(int64_t, m_s), *src = CARVE(int64_t, m_s), *dst = CARVE(int64_t, m_s);
    int64_t *best = CARVE(int64_t, m_s), *before = CARVE(int64_t, m_s), *small = CARVE(int64_t, m_s);
    int64_t *sizes = CARVE(int64_t, cap_s), *tested = CARVE(int64_t, cap_s), *count = CARVE(int64_t, 2 * cap_s);
    int64_t *start = CARVE(int64_t, cap_s), *touched = CARVE(int64_t, cap_s), *votes = CARVE(int64_t, cap_s);
    int64_t *cand = CARVE(int64_t, cap_s);
    double *w = CARVE(double, m_s), *leave = CARVE(double, m_s), *gap = CARVE(double, cap_s);
    double *work = CARVE(double, 5 * d_s);
    float *X = CARVE(float, m_s * d_s), *G = CARVE(float, m_s * d_s);
    char *mark = CARVE(char, cap_s);
    unsigned char *far = CARVE(unsigned char, m_s);
#undef CARVE
    memset(count, 0, sizeof(int64_t) * 2 * cap_s);  /* the scratch that must start at zero */
    memset(votes, 0, sizeof(int64_t) * cap_s);
    memset(mark, 0, cap_s);
    const float *x = b[RX].buf;
    const double *weight = b[RW].buf;
    int64_t *mem_ids = b[RMEMIDS].buf;
    slots_t st = {d, n, b[RSUMS].buf, b[RSEARCH].buf, b[RSQN].buf, b[RCOUNTS].buf, b[RSPREAD].buf, b[RSEEN].buf,
                  b[RCREATED].buf, b[RLAST].buf, b[RIDS].buf, b[RCODES].buf, b[ROPS].buf, 0, cosine};
    Py_ssize_t n_touched = 0;
    Py_BEGIN_ALLOW_THREADS

    /* _split: carve the smaller half out of each cluster whose members 2-means splits far apart */
    Py_ssize_t r = 0, k = split_groups(x, slots, b[RFRESH].buf, m, d, st.n, split_min, 8, rows, sizes, tested, far,
                                       gap, count, start, X, work, &r);
    for (Py_ssize_t g = 0, end = 0; g < k; g++) {
        Py_ssize_t size = (Py_ssize_t)sizes[g], first = end, nf = 0, ns = 0;
        end += size;
        if (!(gap[g] > split_distance * tau))
            continue;
        for (Py_ssize_t i = first; i < end; i++)
            nf += far[i] != 0;
        int take = 2 * nf <= size;  /* the far half when it is the smaller one (or equal) */
        for (Py_ssize_t i = first; i < end; i++)
            if ((far[i] != 0) == take)
                small[ns++] = rows[i];
        if (ns < 2)
            continue;
        if (st.n >= max_clusters)
            break;  /* opening a cluster now would evict one the memory may still point at */
        Py_ssize_t s = st.n++;  /* _open(x[small[0]], 1.0), then emptied: the move brings its members */
        const float *x0 = x + small[0] * d;
        for (Py_ssize_t c = 0; c < d; c++)
            st.sums[s * d + c] = (float)(x0[c] * (float)(1.0 / cscale));
        st.counts[s] = 1.0 / cscale;
        refresh(st.search, st.sqn, st.sums, st.counts, s, d, cosine);
        memset(st.sums + s * d, 0, sizeof(float) * (size_t)d);
        st.counts[s] = st.spread[s] = 0.0;
        st.seen[s] = 0;
        st.created[s] = st.last[s] = step;
        st.ids[s] = next_id++;
        st.codes[s] = -1;
        log_op(&st, OP_OPEN, s, st.ids[s], 0, 0);
        for (Py_ssize_t i = 0; i < ns; i++) {
            memcpy(G + i * d, x + small[i] * d, sizeof(float) * (size_t)d);
            src[i] = slots[small[i]];
            dst[i] = s;
            w[i] = weight[small[i]];
        }
        move_core(G, src, dst, w, ns, d, st.sums, st.counts, st.spread, st.seen, st.search, st.sqn, st.n, cosine,
                  mark, leave);
        for (Py_ssize_t i = 0; i < ns; i++)
            slots[small[i]] = s;
    }

    /* _reassign: one hard k-means step among the touched clusters */
    Py_ssize_t t = distinct(slots, m, st.n, mark, touched);
    if (t >= 2) {
        Py_ssize_t nm = 0;
        for (Py_ssize_t q = 0; q < t; q++) {  /* the touched prototypes side by side, for dot4 */
            memcpy(X + q * d, st.search + touched[q] * d, sizeof(float) * (size_t)d);
            gap[q] = st.sqn[touched[q]];  /* (the split is done with gap) */
        }
        for (Py_ssize_t i = 0; i < m; i++) {
            const float *xi = x + i * d;
            float top = INFINITY, v4[4];
            Py_ssize_t arg = 0;
            for (Py_ssize_t q = 0; q < t; q++) {
                if ((q & 3) == 0) {
                    if (q + 4 <= t)
                        dot4(xi, X + q * d, d, v4);
                    else
                        for (Py_ssize_t u = q; u < t; u++)
                            v4[u - q] = dot(xi, X + u * d, d);
                }
                /* |x|^2 is the same for every prototype: the smallest |p|^2 - 2 x.p, first of equals */
                float v = st.sqn[touched[q]] + -2.0f * v4[q & 3];
                if (v < top || q == 0) {
                    top = v;
                    arg = q;
                }
            }
            best[i] = touched[arg];
            before[i] = slots[i];
            if (best[i] != slots[i]) {
                memcpy(G + nm * d, xi, sizeof(float) * (size_t)d);
                src[nm] = slots[i];
                dst[nm] = best[i];
                w[nm++] = weight[i];
                slots[i] = best[i];
            }
        }
        if (nm)
            move_core(G, src, dst, w, nm, d, st.sums, st.counts, st.spread, st.seen, st.search, st.sqn, st.n, cosine,
                      mark, leave);
        /* _move_members: an unlabelled cluster left without mass is dissolved; its id then
         * resolves to the cluster that took most of its remembered rows (chosen before any
         * removal, so by id), if that one is still there */
        int64_t *empty = src, *heirs = dst;  /* free again after the move */
        Py_ssize_t ne = 0;
        for (Py_ssize_t q = t - 1; q >= 0; q--) {  /* descending: a swap never moves a slot still to go */
            Py_ssize_t s = (Py_ssize_t)touched[q];
            if (!(st.counts[s] * cscale <= 1e-6))
                continue;
            if (st.codes[s] >= 0) {  /* a known class keeps its prototype (its sum is rounding residue) */
                memcpy(st.search + s * d, X + q * d, sizeof(float) * (size_t)d);
                st.sqn[s] = (float)gap[q];
                continue;
            }
            int64_t heir = -1, top = 0;
            for (Py_ssize_t i = 0; i < m; i++)
                if (before[i] == s)
                    votes[best[i]]++;
            for (Py_ssize_t v = 0; v < st.n; v++) {
                if (votes[v] > top) {  /* the first of equals, as bincount's argmax */
                    top = votes[v];
                    heir = v;
                }
                votes[v] = 0;
            }
            empty[ne] = s;
            heirs[ne++] = heir >= 0 ? st.ids[heir] : -1;
        }
        for (Py_ssize_t e = 0; e < ne; e++) {
            Py_ssize_t s = (Py_ssize_t)empty[e], last = st.n - 1;
            int64_t gone = st.ids[s], heir = heirs[e];
            remove_slot(&st, s);
            for (Py_ssize_t i = 0; i < m; i++)
                if (slots[i] == last)
                    slots[i] = s;
            int live = 0;
            for (Py_ssize_t v = 0; v < st.n && heir >= 0 && !live; v++)
                live = st.ids[v] == heir;
            log_op(&st, OP_DISSOLVE, gone, live ? heir : -1, 0, 0);
        }
    }
    for (Py_ssize_t i = 0; i < m; i++)  /* the merges below leave aliases that resolve these */
        mem_ids[i] = st.ids[slots[i]];
    n_touched = t = distinct(slots, m, st.n, mark, touched);

    /* _merge_close: merge established clusters the memory touches, cheapest Ward cost first */
    if (merge_threshold > 0) {
        Py_ssize_t nc = 0;
        for (Py_ssize_t q = 0; q < t; q++)
            if (st.seen[touched[q]] >= min_size || st.codes[touched[q]] >= 0)
                cand[nc++] = touched[q];
        int64_t *codes = count;  /* each candidate's code, by position */
        while (nc >= 2) {
            for (Py_ssize_t q = 0; q < nc; q++)
                codes[q] = st.codes[cand[q]];
            Py_ssize_t i = -1, j = -1;
            double cost = closest_core(st.search, st.sqn, st.counts, cand, codes, nc, d, merge_cap * tau, &i, &j);
            if (i < 0 || !(cost * cscale < merge_cost * tau))
                break;
            Py_ssize_t last = st.n - 1, keep = merge_slots(&st, cand[i], cand[j]);
            Py_ssize_t gone = keep == cand[i] ? cand[j] : cand[i];
            Py_ssize_t nn = 0;
            for (Py_ssize_t q = 0; q < nc; q++)
                if (q != i && q != j)
                    cand[nn++] = cand[q];
            cand[nn++] = keep;
            for (Py_ssize_t q = 0; q < nn; q++)  /* the last slot moved into the gone one's place */
                if (cand[q] == last)
                    cand[q] = gone;
            nc = nn;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nLnn", st.n, next_id, st.n_ops, n_touched);
done:
    PyMem_Free(arena);
    for (int q = 0; q < got; q++)
        PyBuffer_Release(&b[q]);
    return result;
}

/* ---- ward_cut: runtime/recluster.py's better_partition after its distance matrix -------------
 *
 * Python computes the distances as the reference does (numpy) and passes them in. Then (1) Ward's
 * hierarchy by scipy's nearest-neighbour chain (scipy/cluster/_hierarchy.pyx nn_chain) on the
 * matrix's upper triangle, all that scipy reads: the same scans in the same order, the same
 * preference for the chain's previous element, the same Lance-Williams update term by term, so
 * the same merges at the same heights, to the bit; sorted by height stably and named by
 * union-find as scipy's label() names them; (2) the cuts from K = kmax down to kmin, walked as
 * ward_cut_scores walks them (the same column bookkeeping, so the same labels 0..K-1), each
 * scored as silhouette_from_sums scores it; (3) better_partition's pick. Only the silhouettes'
 * sums are added in another order than numpy's (and from dist[j][i] where numpy reads dist[i][j],
 * which can differ in the last bit): that matters only where two cuts' silhouettes, or a cut's
 * and the bar, agree to ~1e-15. Plain loops. Most of the time goes to the linkage's memory
 * traffic: a row read per scan, a row and two columns written per merge. */

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF /* scipy's update, term by term (GCC's ISO C mode does not contract) */
#endif

typedef struct { double h; Py_ssize_t x, y; } merge_t; /* height, slots: scipy's Z[k, :3] before label() */

/* Rows of n doubles an odd number of cache lines apart, so that a column spreads over the cache's
 * sets: with rows 2 KB apart (n = 256) it crowds a few, and mirroring the matrix took 4x as long. */
static Py_ssize_t row_stride(Py_ssize_t n)
{
    Py_ssize_t ld = (n + 7) / 8 * 8;
    return ld / 8 % 2 ? ld : ld + 8;
}

/* The first i in [lo, n) with the smallest row[i], if that is below *low (which becomes it), else
 * -1: scipy's scan, where a NaN never counts. Block by block of 64, each block's smallest in
 * eight running minima (with one, each step would wait for the last), then the index in the
 * first block that had the smallest. */
static Py_ssize_t first_min(const double *row, Py_ssize_t lo, Py_ssize_t n, double *low)
{
    Py_ssize_t at = -1;
    for (Py_ssize_t b = lo; b < n; b += 64) {
        Py_ssize_t end = b + 64 < n ? b + 64 : n, i = b;
        double m[8], v = *low;
        for (int q = 0; q < 8; q++)
            m[q] = v;
        for (; i + 8 <= end; i += 8)
            for (int q = 0; q < 8; q++)
                m[q] = row[i + q] < m[q] ? row[i + q] : m[q];
        for (; i < end; i++)
            m[0] = row[i] < m[0] ? row[i] : m[0];
        for (int q = 0; q < 8; q++)
            v = m[q] < v ? m[q] : v;
        if (v < *low) {
            *low = v;
            at = b;
        }
    }
    while (at >= 0 && row[at] != *low)
        at++;
    return at;
}

/* scipy's nn_chain over w (n x n in rows ld apart, symmetric, diagonal INFINITY; destroyed): z[k]
 * is the k-th merge found. A dead cluster's column is set to INFINITY, so that a scan of a row
 * skips it and the diagonal as scipy's does; the dead below the first live one are not scanned at
 * all (a merge's lower slot dies, so they pile up there). size, chain: n; inv: n + 1. Returns -1
 * where scipy's answer would be meaningless: a NaN from the update (the square root of a rounding
 * below zero, where two centroids coincide; never seen on real data). */
static int nn_chain(double *w, Py_ssize_t n, Py_ssize_t ld, Py_ssize_t *size, Py_ssize_t *chain, double *inv,
                    merge_t *z)
{
    Py_ssize_t len = 0, lo = 0, x = 0, y = 0; /* y persists from merge to merge, as scipy's does */
    for (Py_ssize_t i = 0; i < n; i++) {
        size[i] = 1;
        inv[i + 1] = 1.0 / (double)(i + 1); /* scipy's t = 1.0 / (size_x + size_y + size_i) */
    }
    for (Py_ssize_t k = 0; k < n - 1; k++) {
        while (size[lo] == 0)
            lo++;
        if (len == 0) /* a new chain starts at the first live cluster */
            chain[len++] = lo;
        double low;
        for (;;) { /* follow nearest neighbours until two are each other's */
            x = chain[len - 1];
            low = INFINITY;
            if (len > 1) { /* the previous element keeps a tie (scipy's strict <) */
                y = chain[len - 2];
                low = w[x * ld + y];
            }
            Py_ssize_t i = first_min(w + x * ld, lo, n, &low);
            if (i >= 0)
                y = i;
            if (len > 1 && y == chain[len - 2])
                break;
            if (len == n)
                return -1;
            chain[len++] = y;
        }
        if (!(low < INFINITY))
            return -1;
        len -= 2;
        if (x > y) {
            Py_ssize_t s = x;
            x = y;
            y = s;
        }
        Py_ssize_t nx = size[x], ny = size[y];
        z[k] = (merge_t){low, x, y};
        size[x] = 0;
        size[y] = nx + ny;
        /* scipy's _ward into row and column y for each live i; x's column dies */
        const double *wx = w + x * ld, *t = inv + nx + ny; /* t[s] = 1 / (nx + ny + s) */
        double *wy = w + y * ld, *wi = w + lo * ld, fx = (double)nx, fy = (double)ny; /* wi: row i */
        for (Py_ssize_t i = lo; i < n; i++, wi += ld) {
            if (size[i] == 0 || i == y)
                continue;
            double ni = (double)size[i], ti = t[size[i]];
            wy[i] = wi[y] = sqrt((ni + fx) * ti * wx[i] * wx[i] + (ni + fy) * ti * wy[i] * wy[i] - ni * ti * low * low);
            wi[x] = INFINITY;
        }
        wy[x] = INFINITY;
    }
    return 0;
}

/* the root of x's tree: scipy's LinkageUnionFind.find (there with path compression) */
static Py_ssize_t uf_find(const Py_ssize_t *parent, Py_ssize_t x)
{
    while (parent[x] != x)
        x = parent[x];
    return x;
}

/* sums[c * n + i] (k x n) = point i's summed distances to the points of cluster c (labels 0..k-1),
 * added in the points' order; sizes[c] = c's count. The same for label2 (k2 clusters) into sums2
 * and sizes2, in the same pass over dist. */
static void cluster_sums(const double *dist, Py_ssize_t n, const int64_t *label, Py_ssize_t k, double *sums,
                         double *sizes, const int64_t *label2, Py_ssize_t k2, double *sums2, double *sizes2)
{
    memset(sums, 0, sizeof(double) * (size_t)(n * k));
    memset(sizes, 0, sizeof(double) * (size_t)k);
    memset(sums2, 0, sizeof(double) * (size_t)(n * k2));
    memset(sizes2, 0, sizeof(double) * (size_t)k2);
    for (Py_ssize_t j = 0; j < n; j++) {
        double *s = sums + label[j] * n, *s2 = sums2 + label2[j] * n;
        const double *row = dist + j * n;
        sizes[label[j]] += 1.0;
        sizes2[label2[j]] += 1.0;
        for (Py_ssize_t i = 0; i < n; i++) {
            s[i] += row[i];
            s2[i] += row[i];
        }
    }
}

/* silhouette_from_sums from cluster_sums' sums and sizes (every cluster used); a, b: n scratch */
static double silhouette(double *sums, const double *sizes, const int64_t *label, Py_ssize_t n, Py_ssize_t k,
                         double *a, double *b)
{
    for (Py_ssize_t i = 0; i < n; i++) { /* a: the sum over the own cluster, kept out of b's way */
        a[i] = sums[label[i] * n + i];
        sums[label[i] * n + i] = INFINITY;
        b[i] = INFINITY;
    }
    for (Py_ssize_t c = 0; c < k; c++) /* b: the smallest mean distance to another cluster */
        for (Py_ssize_t i = 0; i < n; i++) {
            double v = sums[c * n + i] / sizes[c];
            b[i] = v < b[i] ? v : b[i];
        }
    double total = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double own = sizes[label[i]];
        sums[label[i] * n + i] = a[i];
        if (own > 1.0) { /* a singleton scores 0 */
            double ai = a[i] / (own - 1.0), top = ai > b[i] ? ai : b[i];
            total += (b[i] - ai) / (top > 1e-12 ? top : 1e-12);
        }
    }
    return total / (double)n;
}

/* ward_cut(dist, current, out, span, margin) -> K: better_partition (runtime/recluster.py) from
 * the points' distance matrix dist (float64 [n, n], symmetric, zero diagonal) and the partition
 * current (int64 [n], labels 0..K0-1, each used): the Ward cut at K in [max(2, K0 - span),
 * min(n - 1, K0 + span)] with the highest silhouette, the fewest clusters among equals, if it beats
 * current's silhouette + margin: its labels (0..K-1, numbered as ward_cut_scores numbers them) go
 * to out (int64 [n]) and K is returned; else 0 and out is left alone (also when K0 < 2 or
 * K0 >= n - 1, where there is nothing to try). RuntimeError where the linkage meets a NaN. */
static PyObject *ward_cut(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!nargs_ok(nargs, 5, "ward_cut"))
        return NULL;
    Py_ssize_t span = PyLong_AsSsize_t(args[3]);
    double margin = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (span < 0) {
        PyErr_SetString(PyExc_ValueError, "ward_cut: span must be >= 0");
        return NULL;
    }
    Py_buffer b[3]; /* dist, current, out */
    int got = 0;
    PyObject *result = NULL;
    char *work = NULL;
    TAKE(0, "dist", 'd', 2, 0, -1, 0);
    Py_ssize_t n = b[0].shape[0];
    TAKE(1, "current", 'q', 1, n, -1, 0);
    TAKE(2, "out", 'q', 1, n, -1, 1);
    if (b[0].shape[1] != n || b[1].shape[0] != n || b[2].shape[0] != n || n > 46340) { /* n * n: 31 bits */
        PyErr_SetString(PyExc_ValueError, "ward_cut: dist must be n x n (n <= 46340), current and out of length n");
        goto done;
    }
    const double *dist = b[0].buf;
    const int64_t *current = b[1].buf;
    Py_ssize_t k0 = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (current[i] < 0 || current[i] >= n) {
            PyErr_Format(PyExc_ValueError, "ward_cut: label %lld of current is not in 0..%zd", (long long)current[i],
                         n - 1);
            goto done;
        }
        k0 = current[i] + 1 > k0 ? (Py_ssize_t)current[i] + 1 : k0;
    }
    if (k0 < 2 || k0 >= n - 1) { /* nothing to try, as in better_partition */
        result = PyLong_FromLong(0);
        goto done;
    }
    double zero[4] = {0.0, 0.0, 0.0, 0.0}; /* 0 * v is 0 for a finite v, else NaN: in four sums, */
    Py_ssize_t e = 0;                      /* which the compiler keeps in vector registers */
    for (; e + 4 <= n * n; e += 4)
        for (int q = 0; q < 4; q++)
            zero[q] += 0.0 * dist[e + q];
    for (; e < n * n; e++)
        zero[0] += 0.0 * dist[e];
    int fine = zero[0] + zero[1] + zero[2] + zero[3] == 0.0;
    for (e = 0; e < n; e++)
        fine = fine && dist[e * n + e] == 0.0;
    if (!fine) {
        PyErr_SetString(PyExc_ValueError, "ward_cut: dist must be finite, with a zero diagonal");
        goto done;
    }
    Py_ssize_t kmin = k0 - span > 2 ? k0 - span : 2, kmax = k0 + span < n - 1 ? k0 + span : n - 1;
    Py_ssize_t ld = row_stride(n);
    /* doubles: w (n x ld), sums (kmax x n), csums (k0 x n), sizes (kmax), csizes (k0), inv (n + 1),
     * sa, sb (n); merges: z (n); indices: size, chain (n), parent, col (2n), node (kmax); labels:
     * label, best (n) */
    size_t nd = (size_t)(n * ld + (kmax + k0) * n + kmax + k0 + 3 * n + 1), ni = (size_t)(6 * n + kmax);
    work = PyMem_Malloc(nd * sizeof(double) + (size_t)n * sizeof(merge_t) + ni * sizeof(Py_ssize_t) +
                        (size_t)(2 * n) * sizeof(int64_t));
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    double *w = (double *)work, *sums = w + n * ld, *csums = sums + kmax * n, *sizes = csums + k0 * n;
    double *csizes = sizes + kmax, *inv = csizes + k0, *sa = inv + n + 1, *sb = sa + n;
    merge_t *z = (merge_t *)(sb + n);
    Py_ssize_t *size = (Py_ssize_t *)(z + n), *chain = size + n, *parent = chain + n, *col = parent + 2 * n;
    Py_ssize_t *node = col + 2 * n;
    int64_t *label = (int64_t *)(node + kmax), *best = label + n;
    memset(csizes, 0, sizeof(double) * (size_t)k0);
    for (Py_ssize_t i = 0; i < n; i++)
        csizes[current[i]] += 1.0;
    for (Py_ssize_t c = 0; c < k0; c++)
        if (csizes[c] == 0.0) {
            PyErr_SetString(PyExc_ValueError, "ward_cut: current must use every label 0..K0-1");
            goto done;
        }
    int chain_ok;
    Py_ssize_t chosen = 0;

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) { /* Ward's matrix: dist's upper triangle, mirrored */
        for (Py_ssize_t j = 0; j < i; j++)
            w[i * ld + j] = w[j * ld + i];
        w[i * ld + i] = INFINITY;
        memcpy(w + i * ld + i + 1, dist + i * n + i + 1, sizeof(double) * (size_t)(n - i - 1));
    }
    chain_ok = nn_chain(w, n, ld, size, chain, inv, z) == 0;
    if (chain_ok) {
        for (Py_ssize_t m = 1; m < n - 1; m++) { /* sorted by height, stably (insertion: the chain */
            merge_t v = z[m];                      /* finds the merges almost in order) */
            Py_ssize_t j = m;
            for (; j > 0 && z[j - 1].h > v.h; j--)
                z[j] = z[j - 1];
            z[j] = v;
        }
        /* the finest cut: the first n - kmax merges; its clusters numbered in the order of their
         * tree nodes, as ward_cut_scores numbers them (np.unique of the top nodes) */
        for (Py_ssize_t v = 0; v < 2 * n - 1; v++) {
            parent[v] = v;
            col[v] = -1;
        }
        Py_ssize_t m = 0, k = 0;
        for (; m < n - kmax; m++) {
            Py_ssize_t a = uf_find(parent, z[m].x), c = uf_find(parent, z[m].y);
            parent[a] = parent[c] = n + m;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            col[uf_find(parent, i)] = 0;
        for (Py_ssize_t v = 0; v < 2 * n - 1; v++)
            if (col[v] == 0) {
                col[v] = k;
                node[k++] = v;
            }
        for (Py_ssize_t i = 0; i < n; i++)
            label[i] = col[uf_find(parent, i)];
        cluster_sums(dist, n, current, k0, csums, csizes, label, kmax, sums, sizes);
        double bar = silhouette(csums, csizes, current, n, k0, sa, sb) + margin, top = 0.0;
        for (;;) {
            double score = silhouette(sums, sizes, label, n, k, sa, sb);
            if (score > bar && (chosen == 0 || score >= top)) { /* equal scores: the fewer clusters */
                top = score;
                chosen = k;
                memcpy(best, label, sizeof(int64_t) * (size_t)n);
            }
            if (k == kmin)
                break;
            /* merge m joins columns ca < cb into ca; the last column moves into cb's place */
            Py_ssize_t a = uf_find(parent, z[m].x), c = uf_find(parent, z[m].y), last = k - 1;
            parent[a] = parent[c] = n + m;
            Py_ssize_t ca = col[a] < col[c] ? col[a] : col[c], cb = col[a] < col[c] ? col[c] : col[a];
            for (Py_ssize_t i = 0; i < n; i++) {
                sums[ca * n + i] += sums[cb * n + i];
                sums[cb * n + i] = sums[last * n + i];
                label[i] = label[i] == cb ? ca : label[i] == last ? cb : label[i];
            }
            sizes[ca] += sizes[cb];
            sizes[cb] = sizes[last];
            node[cb] = node[last];
            col[node[cb]] = cb;
            node[ca] = n + m;
            col[n + m] = ca;
            k--;
            m++;
        }
    }
    Py_END_ALLOW_THREADS

    if (!chain_ok) {
        PyErr_SetString(PyExc_RuntimeError, "ward_cut: NaN distances in Ward's linkage (coinciding centroids)");
        goto done;
    }
    if (chosen > 0)
        memcpy(b[2].buf, best, sizeof(int64_t) * (size_t)n);
    result = PyLong_FromSsize_t(chosen);
done:
    PyMem_Free(work);
    for (int q = 0; q < got; q++)
        PyBuffer_Release(&b[q]);
    return result;
}

static PyMethodDef methods[] = {
    {"fit_rows", (PyCFunction)(void (*)(void))fit_rows, METH_FASTCALL,
     "Assign and learn rows start..end-1 until one needs Python (see the module source)."},
    {"move", (PyCFunction)(void (*)(void))move, METH_FASTCALL,
     "Move remembered samples between slots (see the module source)."},
    {"unit_rows", (PyCFunction)(void (*)(void))unit_rows, METH_FASTCALL,
     "Rows scaled to unit length, as numpy's float32 arithmetic gives them (see the module source)."},
    {"find_ids", (PyCFunction)(void (*)(void))find_ids, METH_FASTCALL,
     "The slots of live cluster ids, by a hash table (see the module source)."},
    {"repair", (PyCFunction)(void (*)(void))repair, METH_FASTCALL,
     "The repair's split, reassignment and merges in one call, its changes to the clusters logged for Python (see the module source)."},
    {"ward_cut", (PyCFunction)(void (*)(void))ward_cut, METH_FASTCALL,
     "better_partition of runtime/recluster.py from a distance matrix: the best Ward cut by silhouette, if it beats the current partition (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_rowloop",
    .m_doc = "The stream clusterer's compiled per-sample loop.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__rowloop(void)
{
#ifdef HAVE_AVX_PATH
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") && getenv("PROTOEDGE_NO_AVX2") == NULL;
#endif
    return PyModule_Create(&module);
}
