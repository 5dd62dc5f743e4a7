#ifndef CCKPT_ZLIB_SHIM_H
#define CCKPT_ZLIB_SHIM_H
#include <zlib.h>
// deflateInit2/inflateInit2 are function-like macros, which Swift cannot import.
static inline int ckpt_deflateInit2(z_streamp strm, int level, int method, int windowBits, int memLevel, int strategy) {
    return deflateInit2(strm, level, method, windowBits, memLevel, strategy);
}
static inline int ckpt_inflateInit2(z_streamp strm, int windowBits) {
    return inflateInit2(strm, windowBits);
}
#endif
