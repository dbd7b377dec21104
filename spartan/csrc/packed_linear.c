/* y = x @ W^T + b for a fixed weight W stored as 16-row strips with their kept column groups packed.
 *
 * Layouts (all row-major, float32): x is (tokens, in) with row stride ldx, y is (tokens, out) with row stride ldy.
 * The weight is cut into strips of 16 output rows (the last one may be shorter: `out` need not be a multiple of
 * 16). Strip s keeps the column groups strip_ptr[s] .. strip_ptr[s+1]-1; group g starts at input column cols[g],
 * spans `width` columns, and its weights are vals[g][j][r] = W[16 s + r][cols[g] + j] (zero-padded rows past
 * `out`). bias has one value per output row, padded to a multiple of 16.
 *
 * Each strip's 16 outputs of one token are one 16-float vector (one AVX-512 register where the compiler has them,
 * two or four narrower ones otherwise): for every kept column the strip's weight column is loaded once and
 * multiplied into the accumulators of TILE tokens, each by that token's input value. Tokens are split between
 * threads; every thread writes only its own rows of y.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define TILE 8
#define MAX_THREADS 256

typedef float v16 __attribute__((vector_size(LANES * sizeof(float))));

static inline v16 load(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef struct {
    const float *x, *vals, *bias;
    float *y;
    const int64_t *strip_ptr, *cols;
    int64_t ldx, ldy, out, width, first, last;
} job;

/* `tt` tokens (a compile-time constant after inlining) of one strip; `rows` of its 16 outputs are stored. */
static inline __attribute__((always_inline)) void strip_tile(const job *a, int tt, int64_t token, int64_t s,
                                                              int64_t rows) {
    v16 acc[TILE];
    const v16 b = load(a->bias + LANES * s);
    for (int k = 0; k < tt; k++) acc[k] = b;
    const float *x = a->x + token * a->ldx;
    for (int64_t g = a->strip_ptr[s]; g < a->strip_ptr[s + 1]; g++) {
        const float *xg = x + a->cols[g], *w = a->vals + g * a->width * LANES;
        for (int64_t j = 0; j < a->width; j++) {
            const v16 wj = load(w + LANES * j);
            for (int k = 0; k < tt; k++) acc[k] += wj * xg[k * a->ldx + j];
        }
    }
    float *y = a->y + token * a->ldy + LANES * s;
    for (int k = 0; k < tt; k++) {
        if (rows == LANES)
            memcpy(y + k * a->ldy, &acc[k], sizeof acc[k]);
        else
            memcpy(y + k * a->ldy, &acc[k], rows * sizeof(float));
    }
}

static void run(const job *a) {
    const int64_t strips = (a->out + LANES - 1) / LANES;
    for (int64_t token = a->first; token < a->last; token += TILE) {
        const int64_t tt = a->last - token < TILE ? a->last - token : TILE;
        for (int64_t s = 0; s < strips; s++) {
            const int64_t rows = a->out - LANES * s < LANES ? a->out - LANES * s : LANES;
            if (tt == TILE)
                strip_tile(a, TILE, token, s, rows);
            else
                for (int64_t k = 0; k < tt; k++) strip_tile(a, 1, token + k, s, rows);
        }
    }
}

static void *run_thread(void *a) {
    run((const job *)a);
    return 0;
}

/* Returns the number of threads that ran (fewer than asked when the system refuses to start one: their tokens are
 * then computed by the calling thread). */
int packed_linear(const float *x, int64_t ldx, float *y, int64_t ldy, int64_t tokens, int64_t out,
                  const int64_t *strip_ptr, const int64_t *cols, const float *vals, int64_t width, const float *bias,
                  int threads) {
    job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int64_t chunk = ((tokens + threads - 1) / threads + TILE - 1) / TILE * TILE;
    int n = 0, ran = 1;
    for (int64_t first = 0; first < tokens; first += chunk, n++) {
        const job a = {x, vals, bias, y, strip_ptr, cols, ldx, ldy, out, width, first,
                       first + chunk < tokens ? first + chunk : tokens};
        jobs[n] = a;
    }
    for (int i = 1; i < n; i++) {
        started[i] = pthread_create(&ids[i], 0, run_thread, &jobs[i]) == 0;
        ran += started[i];
    }
    if (n) run(&jobs[0]);
    for (int i = 1; i < n; i++) {
        if (started[i])
            pthread_join(ids[i], 0);
        else
            run(&jobs[i]);
    }
    return ran;
}
