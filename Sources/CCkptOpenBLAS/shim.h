#ifndef CCKPT_OPENBLAS_SHIM_H
#define CCKPT_OPENBLAS_SHIM_H
#include <cblas.h>
// Exported by OpenBLAS but not declared in every cblas.h variant.
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
// LAPACK's Cholesky routines, which OpenBLAS exports with the Fortran ABI (column-major, arguments by pointer,
// the hidden length of each character argument last).
#include <stddef.h>
void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info, size_t uplo_length);
void dpotri_(const char *uplo, const int *n, double *a, const int *lda, int *info, size_t uplo_length);
#endif
