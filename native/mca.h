// llvm-mca region markers (make bench-neon, tests/bench_neon.py): in a build with DLLAMA_MCA
// defined they put "# LLVM-MCA-BEGIN/END <name>" comments into the assembly around one iteration
// of a hot loop, so llvm-mca reads exactly the steady-state body; in every other build they are
// nothing. The name may hold %c0 and %c1, printed as the compile-time integers a and b (a
// template's parameters: one region per instantiation). They are asm volatile statements, so a marked build is for reading only:
// the compiler keeps them in place, which may move a few instructions across an iteration's edge.
#pragma once

#ifdef DLLAMA_MCA
#define DLLAMA_MCA_BEGIN(name, a, b) asm volatile("# LLVM-MCA-BEGIN " name ::"i"(a), "i"(b))
#define DLLAMA_MCA_END(name, a, b) asm volatile("# LLVM-MCA-END " name ::"i"(a), "i"(b))
#else
#define DLLAMA_MCA_BEGIN(name, a, b) ((void)0)
#define DLLAMA_MCA_END(name, a, b) ((void)0)
#endif
