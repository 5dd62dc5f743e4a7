#ifndef CCKPT_OPENBLAS_SHIM_H
#define CCKPT_OPENBLAS_SHIM_H
#include <cblas.h>
// Exported by OpenBLAS but not declared in every cblas.h variant.
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
#endif
