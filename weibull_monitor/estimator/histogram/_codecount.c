/* Fused code-and-count kernel for CPU histograms (weibull_monitor.estimator.histogram.runtime).
 *
 * Counts the 15-bit magnitude code (word & 0x7FFF) of 16-bit words laid out as a 2-D strided view, in one read
 * pass. The words are bf16/fp16 patterns, or the high halves of fp32 patterns (column stride 2, base + 1 word on
 * little-endian machines), so this is the same code torch.bincount(bits & 0x7FFF) counts, without the mask pass,
 * bincount's own min and max passes, or a code tensor the size of the chunk.
 *
 * Why not torch: torch.bincount counts one element at a time after two extra passes (~0.65 ns per element per
 * core here); this loop is ~0.3 ns from cache, ~0.36 (bf16) and ~0.5 (fp32) from DRAM (see Prefetching).
 *
 * The counting runs without the GIL (callers spread chunks across a thread pool; count_many takes a thread's whole
 * share in one call, so the GIL is released once per batch, not once per chunk). Each thread counts into its own
 * uint32 scratch row; the scratch is then added to the shared int64 output row under a lock (no GIL), which
 * serialises the additions of threads that count chunks of the same matrix, and zeroed for the next call.
 * Only the span of codes seen is drained, so small tensors do not pay for 32768 bins.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <stdint.h>

#define N_BINS 32768
#define CODE_MASK 0x7FFF

/* Prefetching. Without it the loop waits on DRAM: the out-of-order window fills with the increments' stores and
 * few reads are in flight (measured on one core of a shared 2-core Xeon, 40M elements: ~1.0 ns per bf16 element
 * and ~1.5 ns per fp32 one, against ~0.3 ns counted from L2). Contiguous rows (bf16/fp16 words, and fp32 high
 * halves at a column stride of 2) issue one prefetch per 64-byte line, PREFETCH_AHEAD_ELEMENTS elements ahead, into
 * L2 (locality 2: not L1, where the hot bins live, and not non-temporal). Measured on the 100 matrices of a
 * 100M LLaMA-shaped model, one thread, interleaved, fastest of 7 in two runs: against the previous prefetch (one
 * per 8 elements, non-temporal, 1024 ahead) fp32 0.67-0.69 -> 0.49-0.50 ns per element, bf16 0.41-0.44 -> 0.36
 * (their sum() read: 0.39-0.40 and 0.25); 2048 ahead or locality 3: 0.50-0.53 and 0.37-0.39. Other strides keep
 * one non-temporal prefetch per 8 elements. Prefetches never fault, so running past the end of a row is harmless. */
#define PREFETCH_AHEAD_ELEMENTS 1024
#define PREFETCH_AHEAD_STRIDED 1024
#define PREFETCH_MAX_STRIDE 16 /* beyond this every element is its own cache line: leave it to the hardware */
#if defined(__GNUC__) || defined(__clang__)
/* integer arithmetic: the address may lie past the end of the row, which a pointer must not */
#define PREFETCH(p, words) __builtin_prefetch((const void *)((uintptr_t)(p) + (uintptr_t)(words) * 2u), 0, 2)
#define PREFETCH_NTA(p, words) __builtin_prefetch((const void *)((uintptr_t)(p) + (uintptr_t)(words) * 2u), 0, 0)
#else
#define PREFETCH(p, words) ((void)0)
#define PREFETCH_NTA(p, words) ((void)0)
#endif

/* Eight increments of the codes at words p[0], p[S], ..., p[7 S]: independent, so the load and store ports stay
 * busy (sub-histograms gained nothing measurable: the codes of real weights rarely repeat within a few elements). */
#define COUNT8(p, S)                                                                                                   \
    do {                                                                                                               \
        scratch[(p)[0] & CODE_MASK]++;                                                                                 \
        scratch[(p)[(S)] & CODE_MASK]++;                                                                               \
        scratch[(p)[2 * (S)] & CODE_MASK]++;                                                                           \
        scratch[(p)[3 * (S)] & CODE_MASK]++;                                                                           \
        scratch[(p)[4 * (S)] & CODE_MASK]++;                                                                           \
        scratch[(p)[5 * (S)] & CODE_MASK]++;                                                                           \
        scratch[(p)[6 * (S)] & CODE_MASK]++;                                                                           \
        scratch[(p)[7 * (S)] & CODE_MASK]++;                                                                           \
    } while (0)

/* One row of cols words at a column stride of s; returns nothing, counts into scratch. */
static void count_row(const uint16_t *p, Py_ssize_t cols, Py_ssize_t s, uint32_t *scratch) {
    Py_ssize_t c = 0;
    if (s == 1) { /* bf16 / fp16: 32 words per 64-byte line */
        for (; c + 32 <= cols; c += 32, p += 32) {
            PREFETCH(p, PREFETCH_AHEAD_ELEMENTS);
            COUNT8(p, 1);
            COUNT8(p + 8, 1);
            COUNT8(p + 16, 1);
            COUNT8(p + 24, 1);
        }
    } else if (s == 2) { /* high halves of fp32: 16 elements per 64-byte line */
        for (; c + 16 <= cols; c += 16, p += 32) {
            PREFETCH(p, 2 * PREFETCH_AHEAD_ELEMENTS);
            COUNT8(p, 2);
            COUNT8(p + 16, 2);
        }
    } else if (s <= PREFETCH_MAX_STRIDE) {
        for (; c + 8 <= cols; c += 8, p += 8 * s) {
            PREFETCH_NTA(p, PREFETCH_AHEAD_STRIDED * s);
            COUNT8(p, s);
        }
    } else {
        for (; c + 4 <= cols; c += 4, p += 4 * s) {
            scratch[p[0] & CODE_MASK]++;
            scratch[p[s] & CODE_MASK]++;
            scratch[p[2 * s] & CODE_MASK]++;
            scratch[p[3 * s] & CODE_MASK]++;
        }
    }
    for (; c < cols; c++, p += s) {
        scratch[p[0] & CODE_MASK]++;
    }
}

static void count_rows(const uint16_t *base, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t row_stride,
                       Py_ssize_t col_stride, uint32_t *scratch) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        count_row(base + r * row_stride, cols, col_stride, scratch);
    }
}

/* Small inputs: count and track the span of codes >= 1 as we go, so the drain need not scan 32768 bins (which
 * costs more than counting a 64x64 matrix). */
#define TRACKED_MAX_ELEMENTS 65536

static void count_rows_tracked(const uint16_t *base, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t row_stride,
                               Py_ssize_t col_stride, uint32_t *scratch, Py_ssize_t *lo_out,
                               Py_ssize_t *hi_out) {
    unsigned lo = N_BINS, hi = 0;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const uint16_t *p = base + r * row_stride;
        for (Py_ssize_t c = 0; c < cols; c++, p += col_stride) {
            unsigned code = p[0] & CODE_MASK;
            scratch[code]++;
            if (code) {
                lo = code < lo ? code : lo;
                hi = code > hi ? code : hi;
            }
        }
    }
    *lo_out = lo;
    *hi_out = hi;
}

/* Adds scratch[0] and scratch[lo..hi] to out and zeroes them (the caller knows nothing else was counted). */
static void drain_range(uint32_t *scratch, int64_t *out, Py_ssize_t lo, Py_ssize_t hi) {
    out[0] += scratch[0];
    scratch[0] = 0;
    for (Py_ssize_t k = lo; k <= hi; k++) {
        out[k] += scratch[k];
        scratch[k] = 0;
    }
}

/* Adds the codes seen to out and zeroes them in scratch; returns in *lo..*hi the span of the codes >= 1 seen
 * (lo = N_BINS if none). Code 0 (|w| == 0) is left out of the span: exact zeros are common (pruned or padded
 * weights, an exact 0.0 from the Gaussian sampler) and would stretch the span the fit reads down to code 1. */
static void drain(uint32_t *scratch, int64_t *out, Py_ssize_t *lo_out, Py_ssize_t *hi_out) {
    Py_ssize_t lo = 1, hi = N_BINS - 1;
    out[0] += scratch[0];
    scratch[0] = 0;
    while (lo < N_BINS && scratch[lo] == 0) lo++;
    while (hi > lo && scratch[hi] == 0) hi--;
    for (Py_ssize_t k = lo; k <= hi && lo < N_BINS; k++) {
        out[k] += scratch[k];
        scratch[k] = 0;
    }
    *lo_out = lo;
    *hi_out = hi;
}

/* Serialises the drains of threads that count chunks of the same matrix (created at import). */
static PyThread_type_lock drain_lock = NULL;

typedef struct {
    const uint16_t *base;
    Py_ssize_t rows, cols, row_stride, col_stride;
    int64_t *out;
    int64_t *zeros;         /* fp32 jobs: where to add the count of exact zeros (NULL: not asked) */
    Py_ssize_t low_offset;  /* fp32 jobs: the low half of an element, in words from its high half */
    Py_ssize_t lo, hi;
} Job;

static int check_job(Job *job, unsigned long long words, unsigned long long out_addr) {
    if (job->rows < 0 || job->cols < 0 ||
        (job->rows > 0 && job->cols > 0 && (double)job->rows * (double)job->cols >= 4294967296.0)) {
        PyErr_SetString(PyExc_ValueError, "count_codes: rows * cols must be in [0, 2**32)");
        return -1;
    }
    job->base = (const uint16_t *)(uintptr_t)words;
    job->out = (int64_t *)(uintptr_t)out_addr;
    return 0;
}

static int parse_job(PyObject *item, Job *job) {
    unsigned long long words, out_addr, zeros_addr = 0;
    job->low_offset = 0;
    if (!PyArg_ParseTuple(item, "KnnnnK|Kn", &words, &job->rows, &job->cols, &job->row_stride, &job->col_stride,
                          &out_addr, &zeros_addr, &job->low_offset)) {
        return -1;
    }
    job->zeros = (int64_t *)(uintptr_t)zeros_addr;
    return check_job(job, words, out_addr);
}

/* Exact zeros of an fp32 job: elements whose high half has code 0 (|w| < 2**-133) and whose low half is 0 too.
 * Only run when the count found code 0 at all (rare in real weights), so the fit's range check needs no pass of
 * its own over the matrix (fallbacks.in_histogram_range). */
static int64_t count_exact_zeros(const Job *job) {
    int64_t zeros = 0;
    for (Py_ssize_t r = 0; r < job->rows; r++) {
        const uint16_t *p = job->base + r * job->row_stride;
        if (job->col_stride == 2 && (job->low_offset == -1 || job->low_offset == 1)) {
            /* contiguous fp32 patterns: whole 32-bit words, a loop the compiler vectorises */
            const uint32_t *w = (const uint32_t *)(const void *)(p + (job->low_offset < 0 ? -1 : 0));
            uint32_t row_zeros = 0;
            for (Py_ssize_t c = 0; c < job->cols; c++) {
                row_zeros += (w[c] & 0x7FFFFFFFu) == 0;
            }
            zeros += row_zeros;
            continue;
        }
        for (Py_ssize_t c = 0; c < job->cols; c++, p += job->col_stride) {
            zeros += (p[0] & CODE_MASK) == 0 && p[job->low_offset] == 0;
        }
    }
    return zeros;
}

/* Count one job into scratch and drain it into its output row (under drain_lock); sets its span. No GIL needed. */
static void run_job(Job *job, uint32_t *scratch) {
    const int tracked = (double)job->rows * (double)job->cols <= TRACKED_MAX_ELEMENTS;
    if (tracked) {
        count_rows_tracked(job->base, job->rows, job->cols, job->row_stride, job->col_stride, scratch, &job->lo,
                           &job->hi);
    } else {
        count_rows(job->base, job->rows, job->cols, job->row_stride, job->col_stride, scratch);
    }
    const int64_t zeros = job->zeros != NULL && scratch[0] > 0 ? count_exact_zeros(job) : 0;
    PyThread_acquire_lock(drain_lock, WAIT_LOCK);
    if (tracked) {
        drain_range(scratch, job->out, job->lo, job->hi);
    } else {
        drain(scratch, job->out, &job->lo, &job->hi);
    }
    if (job->zeros != NULL) {
        *job->zeros += zeros;
    }
    PyThread_release_lock(drain_lock);
}

static PyObject *span_of(const Job *job) {
    if (job->lo >= N_BINS) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(nn)", job->lo, job->hi);
}

PyDoc_STRVAR(count_codes_doc,
             "count_codes(words, rows, cols, row_stride, col_stride, scratch, out)\n\n"
             "Add the counts of (word & 0x7FFF) over words[r * row_stride + c * col_stride] (uint16 addresses and\n"
             "strides in words) to out (int64[32768] address). scratch: a zeroed uint32[32768] address owned by the\n"
             "calling thread, left zeroed. rows * cols must stay below 2**32. The caller checks every argument.\n"
             "Returns (first, last) code >= 1 counted, or None when there was none.");

static PyObject *count_codes(PyObject *self, PyObject *args) {
    unsigned long long words, scratch_addr, out_addr;
    Job job = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnnnKK", &words, &job.rows, &job.cols, &job.row_stride, &job.col_stride,
                          &scratch_addr, &out_addr)) {
        return NULL;
    }
    if (check_job(&job, words, out_addr)) {
        return NULL;
    }
    uint32_t *scratch = (uint32_t *)(uintptr_t)scratch_addr;
    Py_BEGIN_ALLOW_THREADS
    run_job(&job, scratch);
    Py_END_ALLOW_THREADS
    return span_of(&job);
}

PyDoc_STRVAR(count_many_doc,
             "count_many(jobs, scratch)\n\n"
             "count_codes for every job of a sequence of (words, rows, cols, row_stride, col_stride, out[, zeros,\n"
             "low_offset]) tuples, in order, with the GIL released once for all of them (a thread's whole share of\n"
             "a batch in one call). fp32 jobs may add zeros (an int64 address): the count of their exact zeros,\n"
             "the words at low_offset from each high half being the low halves. Returns one (first, last) span, or\n"
             "None, per job.");

static PyObject *count_many(PyObject *self, PyObject *args) {
    PyObject *seq_arg;
    unsigned long long scratch_addr;
    (void)self;
    if (!PyArg_ParseTuple(args, "OK", &seq_arg, &scratch_addr)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(seq_arg, "count_many: jobs must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Job *jobs = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(Job));
    if (jobs == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (parse_job(PySequence_Fast_GET_ITEM(seq, i), &jobs[i])) {
            PyMem_Free(jobs);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    uint32_t *scratch = (uint32_t *)(uintptr_t)scratch_addr;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        run_job(&jobs[i], scratch);
    }
    Py_END_ALLOW_THREADS
    PyObject *spans = PyList_New(n);
    for (Py_ssize_t i = 0; spans != NULL && i < n; i++) {
        PyObject *span = span_of(&jobs[i]);
        if (span == NULL) {
            Py_CLEAR(spans);
            break;
        }
        PyList_SET_ITEM(spans, i, span);
    }
    PyMem_Free(jobs);
    return spans;
}

/* First index i in [0, width) with cum[i] >= key (width if none) for every key of a row, as torch.searchsorted
 * (side "left") answers it. The fit's keys mostly come in increasing runs (its rank positions, then the quantiles'
 * neighbours), so each search gallops forward from the previous answer; a smaller key searches below it. */
static void search_row(const int64_t *cum, Py_ssize_t width, const int64_t *keys, Py_ssize_t n, int64_t *out) {
    Py_ssize_t prev = 0;
    int64_t prev_key = INT64_MIN;
    for (Py_ssize_t j = 0; j < n; j++) {
        const int64_t key = keys[j];
        Py_ssize_t lo = 0, hi = prev;
        if (key >= prev_key) { /* every index below prev holds less than prev_key <= key */
            Py_ssize_t probe = prev, step = 1;
            lo = prev;
            while (probe < width && cum[probe] < key) {
                lo = probe + 1;
                probe = lo + step;
                step *= 2;
            }
            hi = probe < width ? probe : width;
        }
        while (lo < hi) { /* the answer lies in [lo, hi] */
            const Py_ssize_t mid = lo + (hi - lo) / 2;
            if (cum[mid] < key) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        out[j] = lo;
        prev = lo;
        prev_key = key;
    }
}

PyDoc_STRVAR(search_rows_doc,
             "search_rows(cum, rows, width, keys, n, out)\n\n"
             "torch.searchsorted(cum, keys) for contiguous int64 [rows, width] cum (each row non-decreasing) and\n"
             "[rows, n] keys, into the int64 [rows, n] out (addresses). Runs without the GIL.");

static PyObject *search_rows(PyObject *self, PyObject *args) {
    unsigned long long cum_addr, keys_addr, out_addr;
    Py_ssize_t rows, width, n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnKnK", &cum_addr, &rows, &width, &keys_addr, &n, &out_addr)) {
        return NULL;
    }
    if (rows < 0 || width < 0 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "search_rows: negative size");
        return NULL;
    }
    const int64_t *cum = (const int64_t *)(uintptr_t)cum_addr;
    const int64_t *keys = (const int64_t *)(uintptr_t)keys_addr;
    int64_t *out = (int64_t *)(uintptr_t)out_addr;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        search_row(cum + r * width, width, keys + r * n, n, out + r * n);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"count_codes", count_codes, METH_VARARGS, count_codes_doc},
    {"count_many", count_many, METH_VARARGS, count_many_doc},
    {"search_rows", search_rows, METH_VARARGS, search_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_codecount", "Fused code-and-count kernel for CPU weight histograms.", -1, methods,
};

PyMODINIT_FUNC PyInit__codecount(void) {
    if (drain_lock == NULL && (drain_lock = PyThread_allocate_lock()) == NULL) {
        return PyErr_NoMemory();
    }
    return PyModule_Create(&module);
}
