/* dgate: one sample's decision gate in one call (see dgate_cli/_native.py).

   A gate after a stage is an average pooling over an s x s grid of even windows and a linear
   layer. In PyTorch that is three or four small operations, and right after a stage each costs
   10-40 us on a CPU (the stage has pushed the runtime's code out of the caches), ~90 us a gate in
   all for one sample; here it is one call of ~15-30 us.

   Plain C99 with fixed float32 arithmetic (built without -ffast-math and with -ffp-contract=off),
   so the bits do not depend on the compiler's choices: GatedModel.gate_outputs uses this too, for
   one sample, and both agree exactly. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

static __thread float *tl_buf = NULL; /* per thread (kept until the process ends, a few KB): the pooled
                                         features, then the K outputs */
static __thread size_t tl_cap = 0;
static __thread int tl_d = 0, tl_k = 0; /* where the last call's outputs are, and how many */

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

/* x: one stage output, dense float32, (c, h, w) order (nhwc = 0) or (h, w, c) order (nhwc = 1);
   wt: (k, c*s*s) weights in (c, s, s) order; b: (k). Pools, multiplies, adds the bias in float32
   and returns the exit score of the k outputs: rule 0 the largest, rule 1 the largest minus the
   second (-inf padding for k = 1); NaN if an output is NaN (as torch's max and topk rank NaN
   first). The outputs stay in this thread's buffer for dgate_outputs. */
float dgate_gate1(const float *x, int c, int h, int w, int s, int nhwc, const float *wt, const float *b, int k,
                  int rule)
{
    const int bh = h / s, bw = w / s, ss = s * s, d = c * ss;
    tl_k = 0; /* no outputs until they are complete */
    float *pooled = buffer((size_t)d + (size_t)k);
    if (!pooled)
        return NAN;
    float *z = pooled + d;
    const float inv = 1.0f / (float)(bh * bw);
    memset(pooled, 0, (size_t)d * sizeof(float));
    if (nhwc) {
        for (int y = 0; y < h; y++) {
            const int gy = y / bh;
            for (int xx = 0; xx < w; xx++) {
                const float *px = x + ((size_t)y * w + xx) * c;
                float *dst = pooled + gy * s + xx / bw; /* feature (ch, gy, gx) at ch*s*s + gy*s + gx */
                for (int ch = 0; ch < c; ch++)
                    dst[(size_t)ch * ss] += px[ch];
            }
        }
    } else {
        for (int ch = 0; ch < c; ch++)
            for (int y = 0; y < h; y++) {
                const float *row = x + ((size_t)ch * h + y) * w;
                float *dst = pooled + (size_t)ch * ss + (y / bh) * s;
                for (int xx = 0; xx < w; xx++)
                    dst[xx / bw] += row[xx];
            }
    }
    for (int i = 0; i < d; i++)
        pooled[i] *= inv;
    for (int j = 0; j < k; j++) {
        const float *wj = wt + (size_t)j * d;
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        int i = 0;
        for (; i + 8 <= d; i += 8)
            for (int l = 0; l < 8; l++)
                acc[l] += wj[i + l] * pooled[i + l];
        float t = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; i < d; i++)
            t += wj[i] * pooled[i];
        z[j] = t + b[j];
    }
    tl_d = d;
    tl_k = k;
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

/* Copies the k outputs of this thread's last dgate_gate1 call to dst; returns how many (0 if k
   does not match). */
int dgate_outputs(float *dst, int k)
{
    if (k != tl_k || !tl_buf)
        return 0;
    memcpy(dst, tl_buf + tl_d, (size_t)k * sizeof(float));
    return k;
}
