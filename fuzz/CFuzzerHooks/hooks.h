#ifndef CKPT_FUZZER_HOOKS_H
#define CKPT_FUZZER_HOOKS_H
#include <stddef.h>
#include <stdint.h>
// libFuzzer's built-in mutator, callable from a custom mutator (defined by the fuzzer runtime that
// -sanitize=fuzzer links in).
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t maxSize);
#endif
