// Picks the kernel set once: the best one the CPU supports, unless DLLAMA_KERNELS says otherwise.
//   DLLAMA_KERNELS=generic      the portable reference
//   DLLAMA_KERNELS=avx2|neon    that set, or generic with a warning when the CPU lacks it
//   unset, empty or "auto"      the best supported set (an unknown value warns and means auto)
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace dllama {

// The instruction-set files are compiled only on their architecture; elsewhere the entry points
// exist and say "not available".
#ifndef DLLAMA_HAVE_AVX2
const Kernels* kernels_avx2() { return nullptr; }
#endif
#ifndef DLLAMA_HAVE_NEON
const Kernels* kernels_neon() { return nullptr; }
#endif

static const Kernels* best_kernels() {
    if (const Kernels* k = kernels_avx2()) return k;
    if (const Kernels* k = kernels_neon()) return k;
    return &kernels_generic();
}

static const Kernels* choose_kernels() {
    const char* want = std::getenv("DLLAMA_KERNELS");
    if (want == nullptr || want[0] == '\0' || std::strcmp(want, "auto") == 0) return best_kernels();
    if (std::strcmp(want, "generic") == 0) return &kernels_generic();
    const bool is_avx2 = std::strcmp(want, "avx2") == 0;
    if (is_avx2 || std::strcmp(want, "neon") == 0) {
        if (const Kernels* k = is_avx2 ? kernels_avx2() : kernels_neon()) return k;
        std::fprintf(stderr,
                     "dllama: warning: DLLAMA_KERNELS=%s is not supported on this CPU, "
                     "using the generic kernels\n",
                     want);
        return &kernels_generic();
    }
    const Kernels* k = best_kernels();
    std::fprintf(stderr,
                 "dllama: warning: unknown DLLAMA_KERNELS=%s (expected generic, avx2, neon or "
                 "auto), using %s\n",
                 want, k->name);
    return k;
}

const Kernels& kernels() {
    static const Kernels* const chosen = choose_kernels();  // thread-safe one-time init
    return *chosen;
}

}  // namespace dllama
